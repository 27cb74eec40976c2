//! The time by which a reasoning step must be done, as set by whoever bounds it (the server's `--reason-timeout`,
//! the cascade's `--stage-timeout`), visible to the backends below it.
//!
//! A bound is a plain timeout: the step's future is dropped when it expires. A remote backend whose request is
//! dropped that way cannot tell, from the drop alone, a server that never answered from a client that hung up;
//! [`passed`] tells it. The remote client then counts an attempt that ran into the deadline, with no word from its
//! server since it went out, against that server's health, as one that ran into its own request timeout: a server
//! that accepts requests and never answers them leaves rotation even when every caller gives up first.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio::time::error::Elapsed;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `work`, giving up on it after `limit`. Within it, the deadline is `limit` from now, or an enclosing
/// deadline if that comes sooner. The work is dropped, when it is, with the deadline still visible to it.
pub async fn within<F: Future>(limit: Duration, work: F) -> Result<F::Output, Elapsed> {
    // Taken before the timer below starts, so that once the timer has fired the deadline has surely passed.
    let mine = Instant::now().checked_add(limit);
    let deadline = match (current(), mine) {
        (Some(outer), Some(mine)) => outer.min(mine),
        (Some(outer), None) => outer,
        (None, Some(mine)) => mine,
        // A limit past the end of time bounds nothing.
        (None, None) => return Ok(work.await),
    };
    DEADLINE.scope(deadline, tokio::time::timeout(limit, work)).await
}

/// `work` under this task's deadline, for a task spawned to do part of the step: a spawned task starts without
/// the task-locals of the one that spawned it.
pub fn carried<F: Future>(work: F) -> impl Future<Output = F::Output> {
    let deadline = current();
    async move {
        match deadline {
            Some(deadline) => DEADLINE.scope(deadline, work).await,
            None => work.await,
        }
    }
}

/// The deadline of the step this task is running, if anyone set one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// Whether this task's step has run out of time: true while a step bounded by [`within`] is being dropped for it.
pub fn passed() -> bool {
    current().is_some_and(|deadline| Instant::now() >= deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tells, as it is dropped, whether its step's deadline had passed.
    struct Witness(std::sync::Arc<std::sync::Mutex<Option<bool>>>);

    impl Drop for Witness {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(passed());
        }
    }

    #[tokio::test]
    async fn work_dropped_at_its_deadline_sees_it_passed_and_a_sooner_outer_deadline_wins() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let witness = Witness(seen.clone());
        let stalled = async move {
            let _witness = witness;
            std::future::pending::<()>().await
        };
        assert!(within(Duration::from_millis(20), stalled).await.is_err());
        assert_eq!(*seen.lock().unwrap(), Some(true), "dropped by its deadline, with the deadline in view");

        let outer = within(Duration::from_millis(50), async {
            let inner = current().unwrap();
            within(Duration::from_secs(600), async { current().unwrap() }).await.unwrap() == inner
        });
        assert!(outer.await.unwrap(), "an inner bound never outlasts the one around it");
    }

    #[tokio::test]
    async fn work_dropped_for_another_reason_sees_no_deadline_passed() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let witness = Witness(seen.clone());
        let stalled = within(Duration::from_secs(600), async move {
            let _witness = witness;
            std::future::pending::<()>().await
        });
        // A caller that stops waiting (a client that hung up) is no deadline of the step's.
        assert!(tokio::time::timeout(Duration::from_millis(20), stalled).await.is_err());
        assert_eq!(*seen.lock().unwrap(), Some(false));
        assert!(!passed() && current().is_none(), "outside any step, no deadline");
    }
}
