//! Token buckets for reasoning calls and for the tokens they spend: over budget, work waits instead of being
//! dropped or allowed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safeguard_core::{Decision, TokenBudgets, Usage};
use safeguard_harmony::Effort;

/// The reasoning budget is spent: hold the item (pending) and try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("the reasoning budget is spent; retry in {retry_after:?}")]
pub struct Deferred {
    pub retry_after: Duration,
}

/// A deferral is asked again within the hour at the latest, however low the configured rate.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The longest an admission waits, whatever it is told: a year, far past any deployment's patience.
pub const LONGEST_WAIT: Duration = Duration::from_secs(365 * 86_400);

/// The budgets every reasoning path takes from, the cascade's and the direct ones alike, so that no way into the
/// model spends past them: prompts per second, and tokens (uncached prompt and completion) per second.
///
/// Queued work (jobs, the NATS stream) may be held to a share of them ([`Self::for_queue`]), so that a backlog,
/// which always has the next item ready, cannot take every call as it refills and leave requests waiting on an
/// answer with 429s.
#[derive(Debug, Clone, Default)]
pub struct Budgets {
    pub calls: Option<Arc<ReasoningBudget>>,
    pub tokens: Option<Arc<ReasoningBudget>>,
    /// The queue's own smaller buckets, taken from as well as the shared ones.
    queue_lane: Option<Arc<Budgets>>,
    /// What a failed prompt costs when its caller set no completion cap: the reasoner's own cap for the effort.
    completion_caps: TokenBudgets,
    /// The admissions waiting for the buckets to refill, shared by every clone. Without it an item of several
    /// policies, which needs that many calls at once, lost every refill to items of one policy and waited until it
    /// was deferred, again and again: starved under a saturated budget.
    line: Arc<Line>,
}

/// Admissions waiting for calls, served first come first served: tokio's mutex is fair, and its holder is the one
/// whose turn it is. While anyone waits, nobody else takes calls without joining the line.
#[derive(Debug, Default)]
struct Line {
    turn: tokio::sync::Mutex<()>,
    /// How many admissions are in line (waiting for their turn, or for calls on it).
    waiting: AtomicUsize,
}

/// Which buckets refused an admission, and how long until they could grant it.
#[derive(Debug, Clone, Copy)]
enum Short {
    /// The queue's own lane: waited for outside the line.
    Lane(Duration),
    /// The buckets everyone shares: waited for in the line.
    Shared(Duration),
}

impl Short {
    fn wait(self) -> Duration {
        match self {
            Short::Lane(wait) | Short::Shared(wait) => wait,
        }
    }
}

/// A place in the [`Line`]'s count, left when dropped: also when the admission is cancelled (its client went away).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn join(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::SeqCst);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Budgets {
    pub fn new(calls: Option<Arc<ReasoningBudget>>, tokens: Option<Arc<ReasoningBudget>>) -> Self {
        Self { calls, tokens, queue_lane: None, completion_caps: TokenBudgets::default(), line: Arc::default() }
    }

    /// The completion caps the reasoner applies per effort to a prompt with none of its own
    /// ([`Reasoner::completion_cap`](safeguard_core::Reasoner::completion_cap)).
    #[must_use]
    pub fn with_completion_caps(mut self, caps: TokenBudgets) -> Self {
        self.completion_caps = caps;
        self
    }

    /// What one prompt at `effort` may cost in completion tokens: the caller's cap, or the reasoner's.
    pub fn completion_cap(&self, effort: Effort, max_tokens: Option<usize>) -> usize {
        max_tokens.unwrap_or_else(|| self.completion_caps.for_effort(effort))
    }

    pub fn is_unlimited(&self) -> bool {
        self.calls.is_none() && self.tokens.is_none()
    }

    /// The budgets for queued work: the same shared buckets, plus a lane of `share` of each rate that queued work
    /// must also take from. Whatever the backlog, at least `1 - share` of the rate is left for everyone else,
    /// who may still use all of it while the queue is idle. This holds over time, not at every instant: the lane's
    /// burst is rounded up to a whole call. A `share` outside `(0, 1)` leaves the queue unlimited.
    pub fn for_queue(&self, share: f64) -> Budgets {
        if !(share > 0.0 && share < 1.0) || self.is_unlimited() {
            return self.clone();
        }
        let lane = |bucket: &Option<Arc<ReasoningBudget>>| bucket.as_ref().map(|b| Arc::new(b.share(share)));
        let lane = Budgets::new(lane(&self.calls), lane(&self.tokens)).with_completion_caps(self.completion_caps);
        Self { queue_lane: Some(Arc::new(lane)), ..self.clone() }
    }

    /// Takes `prompts` calls, waiting up to `max_wait` (at most [`LONGEST_WAIT`]) for them, in line behind those
    /// already waiting; past that, [`Deferred`] with the time left. The token budget is only checked (what a step
    /// spends is known after it ran, [`charge`](Self::charge)), so a refusal by either takes nothing.
    pub async fn admit(&self, prompts: usize, max_wait: Duration) -> Result<(), Deferred> {
        if prompts == 0 || self.is_unlimited() {
            return Ok(());
        }
        let now = Instant::now();
        // A wait too long to add to the clock (a `--max-budget-wait` of 1e19 seconds) is a year: still "wait", where
        // falling back to `now` would have meant "never wait".
        let deadline = now.checked_add(max_wait.min(LONGEST_WAIT)).unwrap_or(now);
        let in_time = |wait: Duration| Instant::now().checked_add(wait).is_some_and(|ready| ready <= deadline);
        let deferred = |wait: Duration| {
            metrics::counter!("safeguard_pipeline_deferred_total").increment(1);
            Err(Deferred { retry_after: wait.min(MAX_RETRY_AFTER) })
        };
        loop {
            // Queued work waits for its own lane outside the line: holding the turn while the lane refills would
            // keep everyone else from calls the shared buckets hold, and undo the queue's share.
            if let Some(lane) = &self.queue_lane {
                let wait = lane.shortfall(prompts);
                if !wait.is_zero() {
                    if !in_time(wait) {
                        return deferred(wait);
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            if self.line.waiting.load(Ordering::SeqCst) == 0 {
                match self.take_now(prompts) {
                    Ok(()) => return Ok(()),
                    // Another queued item took the lane's calls meanwhile: wait for them again.
                    Err(Short::Lane(_)) => continue,
                    Err(Short::Shared(wait)) if !in_time(wait) => return deferred(wait),
                    Err(Short::Shared(_)) => {}
                }
            }
            // In line from here until admitted, deferred, or sent back to wait for the lane: whoever comes meanwhile
            // waits behind this admission.
            let _waiting = Waiting::join(&self.line.waiting);
            let Ok(_turn) = tokio::time::timeout_at(deadline.into(), self.line.turn.lock()).await else {
                return deferred(self.wait_behind_line(prompts));
            };
            loop {
                match self.take_now(prompts) {
                    Ok(()) => return Ok(()),
                    Err(Short::Lane(_)) => break,
                    Err(Short::Shared(wait)) if in_time(wait) => tokio::time::sleep(wait).await,
                    Err(Short::Shared(wait)) => return deferred(wait),
                }
            }
        }
    }

    /// Takes `prompts` calls now, or says how long until they could be taken; never waits, and never takes calls
    /// before an admission waiting in line ([`admit`](Self::admit)).
    pub fn try_admit(&self, prompts: usize) -> Result<(), Duration> {
        if self.line.waiting.load(Ordering::SeqCst) > 0 {
            return Err(self.wait_behind_line(prompts));
        }
        self.take_now(prompts).map_err(Short::wait)
    }

    /// A guess at how long until `prompts` calls are taken behind whoever is in line: the wait for the calls as if
    /// there were none ahead, and at least a moment, for a retry hint; the line's own needs are not known.
    fn wait_behind_line(&self, prompts: usize) -> Duration {
        let lane = self.queue_lane.as_ref().map_or(Duration::ZERO, |lane| lane.shortfall(prompts));
        self.shortfall(prompts).max(lane).max(Duration::from_millis(50))
    }

    /// How long until this budget's own buckets (not a queue lane's) could grant `prompts` calls; zero if now.
    fn shortfall(&self, prompts: usize) -> Duration {
        let calls = self.calls.as_ref().map_or(Duration::ZERO, |calls| calls.wait_for(prompts));
        let tokens = self.tokens.as_ref().map_or(Duration::ZERO, |tokens| tokens.wait_for(0));
        calls.max(tokens)
    }

    /// Takes `prompts` calls now if the buckets hold them, whoever is in line; says which refused.
    fn take_now(&self, prompts: usize) -> Result<(), Short> {
        if let Some(lane) = &self.queue_lane {
            lane.take_own(prompts).map_err(Short::Lane)?;
        }
        let taken = self.take_own(prompts);
        if taken.is_err()
            && let Some(lane) = &self.queue_lane
        {
            // The shared buckets refused: what the lane granted goes back, so a refusal takes nothing.
            lane.give_back_calls(prompts);
        }
        taken.map_err(Short::Shared)
    }

    /// Takes `prompts` calls from this budget's own buckets (the token bucket only checked).
    fn take_own(&self, prompts: usize) -> Result<(), Duration> {
        let tokens = self.tokens.as_ref().map_or(Ok(()), |tokens| tokens.try_take(0));
        tokens.and_then(|()| self.calls.as_ref().map_or(Ok(()), |calls| calls.try_take(prompts)))
    }

    /// Returns calls taken for work that did not happen (a queue that turned out to be empty).
    pub fn give_back_calls(&self, prompts: usize) {
        if let Some(calls) = &self.calls {
            calls.give_back(prompts);
        }
        if let Some(lane) = &self.queue_lane {
            lane.give_back_calls(prompts);
        }
    }

    /// Calls already under way: paid for, in debt if need be.
    pub fn owe_calls(&self, prompts: usize) {
        if let Some(calls) = &self.calls {
            calls.take_owed(prompts);
        }
        if let Some(lane) = &self.queue_lane {
            lane.owe_calls(prompts);
        }
    }

    /// Pays for the tokens a step spent, once they are known.
    pub fn charge(&self, tokens: usize) {
        if let Some(budget) = &self.tokens {
            budget.take_owed(tokens);
        }
        if let Some(lane) = &self.queue_lane {
            lane.charge(tokens);
        }
    }

    /// Pays for one prompt: its usage, or, when it failed (`None`), its completion cap, since the engine may still
    /// be decoding it.
    pub fn charge_prompt(&self, effort: Effort, usage: Option<&Usage>, max_tokens: Option<usize>) {
        self.charge(usage.map_or_else(|| self.completion_cap(effort, max_tokens), Usage::billed_tokens));
    }

    /// Pays for a decision: the tokens its answered prompts spent, and the completion cap of each failed one. The
    /// one rule for every path (direct, batch, job, cascade step, NATS): a failure reports no usage, yet a timed-out
    /// prompt may still be decoding and a failing backend should not be asked again at full rate, so a failure
    /// costs what the prompt could have cost.
    pub fn charge_decision(&self, decision: &Decision, max_tokens: Option<usize>) {
        let failed = decision.prompts.iter().filter(|prompt| prompt.error.is_some()).count();
        let failed_cost = failed.saturating_mul(self.completion_cap(decision.effort, max_tokens));
        self.charge(decision.usage.billed_tokens().saturating_add(failed_cost));
    }

    /// A reasoning step about to run, paid for by [`UnpaidStep::pay`], or at `worst_case` tokens if it is dropped
    /// first.
    pub fn step(&self, worst_case: usize) -> UnpaidStep {
        UnpaidStep { budgets: self.clone(), worst_case, paid: false }
    }

    /// [`step`](Self::step) for `prompts` prompts at `effort`: each at its completion cap at worst.
    pub fn step_of(&self, prompts: usize, effort: Effort, max_tokens: Option<usize>) -> UnpaidStep {
        self.step(prompts.saturating_mul(self.completion_cap(effort, max_tokens)))
    }
}

/// A reasoning step admitted and not paid for yet. A client that hangs up drops its request's future, step and
/// all, while the engine may go on decoding: dropped unpaid, the step pays its worst case, or hanging up would be
/// a way around the token budget. Paid once: a second payment is ignored.
#[must_use = "an unpaid step pays its worst case when dropped"]
pub struct UnpaidStep {
    budgets: Budgets,
    worst_case: usize,
    paid: bool,
}

impl UnpaidStep {
    /// Pays what `decision` spent ([`Budgets::charge_decision`]).
    pub fn pay(&mut self, decision: &Decision, max_tokens: Option<usize>) {
        self.pay_all(std::slice::from_ref(decision), max_tokens);
    }

    /// Pays what each of `decisions` spent.
    pub fn pay_all(&mut self, decisions: &[Decision], max_tokens: Option<usize>) {
        if !std::mem::replace(&mut self.paid, true) {
            decisions.iter().for_each(|decision| self.budgets.charge_decision(decision, max_tokens));
        }
    }

    /// Pays one prompt ([`Budgets::charge_prompt`]).
    pub fn pay_prompt(&mut self, effort: Effort, usage: Option<&Usage>, max_tokens: Option<usize>) {
        if !std::mem::replace(&mut self.paid, true) {
            self.budgets.charge_prompt(effort, usage, max_tokens);
        }
    }
}

impl Drop for UnpaidStep {
    fn drop(&mut self) {
        if !self.paid {
            self.budgets.charge(self.worst_case);
        }
    }
}

/// Reasoning prompts per second, with a burst allowance.
#[derive(Debug)]
pub struct ReasoningBudget {
    rate_per_sec: f64,
    burst: f64,
    /// The lowest the bucket goes ([`Self::debt_floor`]).
    floor: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl ReasoningBudget {
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        let rate_per_sec = rate_per_sec.max(f64::MIN_POSITIVE);
        Self {
            rate_per_sec,
            burst,
            floor: Self::debt_floor(rate_per_sec, burst),
            state: Mutex::new(Bucket { tokens: burst, refilled_at: Instant::now() }),
        }
    }

    /// How far into debt a bucket may go: what it refills in [`MAX_RETRY_AFTER`], or one burst where that is more.
    /// Debt is meant (an item larger than the burst, an escalation, tokens counted after the fact all pay in full),
    /// but only a wrong count can run up more than an hour of it, since admission refuses at any debt and only work
    /// already under way adds to it: a backend reporting 2^64 tokens would otherwise refuse every item until a
    /// restart, longer than any deferral tells a client to wait.
    fn debt_floor(rate_per_sec: f64, burst: f64) -> f64 {
        -(rate_per_sec * MAX_RETRY_AFTER.as_secs_f64()).max(burst)
    }

    /// Takes `n` from a refilled bucket, down to the floor at most.
    fn debit(&self, bucket: &mut Bucket, n: usize) {
        let left = bucket.tokens - n as f64;
        if left < self.floor {
            tracing::warn!(
                taken = n,
                floor = self.floor,
                "a reasoning budget charge would put the bucket deeper in debt than an hour of its rate; charging to \
                 that depth only"
            );
        }
        bucket.tokens = left.max(self.floor);
    }

    /// A bucket of `share` of this one's rate and burst (at least one call), starting full.
    fn share(&self, share: f64) -> Self {
        let burst = (self.burst * share).ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
        Self::new(self.rate_per_sec * share, burst)
    }

    /// Takes `n` calls' worth of budget, or says how long until it may. Every call is paid for, but admission
    /// needs only `min(n, burst)` in the bucket, so an item with more policies than the burst is not starved
    /// forever: it takes the rest as debt, which the items after it wait out. `n = 0` only checks that the bucket
    /// is not in debt (how the token budget admits an item before anyone knows what it will spend).
    pub fn try_take(&self, n: usize) -> Result<(), Duration> {
        self.try_take_at(n, Instant::now())
    }

    /// Takes `n` calls' worth of budget now, in debt if need be. For work an item already started (its
    /// escalation): deferring it would throw away the reasoning already paid for, and retrying would pay again.
    pub fn take_owed(&self, n: usize) {
        let mut bucket = self.refilled(Instant::now());
        self.debit(&mut bucket, n);
    }

    /// Puts back `n` calls taken for work that did not happen; never above the burst.
    pub fn give_back(&self, n: usize) {
        let mut bucket = self.refilled(Instant::now());
        bucket.tokens = (bucket.tokens + n as f64).min(self.burst);
    }

    /// How long until `n` calls could be taken (zero if now), taking nothing.
    fn wait_for(&self, n: usize) -> Duration {
        self.wait_in(&self.refilled(Instant::now()), n)
    }

    /// How long until `bucket` holds what admitting `n` calls needs (`min(n, burst)`); zero if it does now.
    fn wait_in(&self, bucket: &Bucket, n: usize) -> Duration {
        let missing = (n as f64).min(self.burst) - bucket.tokens;
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        // A rate so low that the wait overflows a Duration waits "forever" rather than panicking.
        Duration::try_from_secs_f64(missing / self.rate_per_sec).unwrap_or(Duration::MAX)
    }

    fn try_take_at(&self, n: usize, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.refilled(now);
        match self.wait_in(&bucket, n) {
            Duration::ZERO => {
                self.debit(&mut bucket, n);
                Ok(())
            }
            wait => Err(wait),
        }
    }

    fn refilled(&self, now: Instant) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_sec).min(self.burst);
        // `now` was read before the lock was taken: a caller that read it earlier but locked later must not move the
        // refill time back, or the next caller is credited the same interval twice.
        bucket.refilled_at = bucket.refilled_at.max(now);
        bucket
    }

    /// Calls available right now (rounded down), for the queue-depth view.
    pub fn available(&self) -> usize {
        let bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = bucket.refilled_at.elapsed().as_secs_f64();
        (bucket.tokens + elapsed * self.rate_per_sec).min(self.burst) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_the_burst_then_refills_at_the_rate() {
        let budget = ReasoningBudget::new(2.0, 3);
        let t0 = Instant::now();
        assert!(budget.try_take_at(2, t0).is_ok());
        assert!(budget.try_take_at(1, t0).is_ok());
        let wait = budget.try_take_at(1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(budget.try_take_at(1, t0 + Duration::from_millis(500)).is_ok());
    }

    /// Two callers read the clock, and the later reader locks first: the earlier one's time must not move the
    /// refill back, which credited the interval between them twice.
    #[test]
    fn a_caller_with_an_older_clock_reading_does_not_refill_the_bucket_again() {
        let budget = ReasoningBudget::new(1.0, 5);
        let t0 = Instant::now();
        assert!(budget.try_take_at(5, t0).is_ok());
        let t1 = t0 + Duration::from_secs(2);
        assert!(budget.try_take_at(2, t1).is_ok(), "two calls refilled by t1");
        assert!(budget.try_take_at(1, t0 + Duration::from_secs(1)).is_err(), "nothing left at t1, read late");
        assert!(budget.try_take_at(1, t1).is_err(), "and the second between t0 and t1 is not credited again");
        assert!(budget.try_take_at(1, t1 + Duration::from_secs(1)).is_ok());
    }

    /// Waits until an admission holds the line's turn (not only counts itself in line).
    async fn until_someone_holds_the_turn(budget: &Budgets) {
        while budget.line.turn.try_lock().is_ok() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Under a saturated budget, items of one policy took each call as it refilled, and an item of three, which
    /// needs three at once, waited until it was deferred. Now it is served in its turn, and who comes after it
    /// waits behind it, or is deferred, even while a call is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_item_of_several_policies_is_not_starved_by_items_of_one() {
        let budget = Budgets::new(Some(Arc::new(ReasoningBudget::new(10.0, 3))), None);
        assert!(budget.try_admit(3).is_ok(), "the burst is spent");
        let admitted = Arc::new(Mutex::new(Vec::new()));
        let several = tokio::spawn({
            let (budget, admitted) = (budget.clone(), admitted.clone());
            async move {
                budget.admit(3, Duration::from_secs(10)).await.unwrap();
                admitted.lock().unwrap().push("several");
            }
        });
        until_someone_holds_the_turn(&budget).await;
        let singles: Vec<_> = (0..6)
            .map(|_| {
                let (budget, admitted) = (budget.clone(), admitted.clone());
                tokio::spawn(async move {
                    budget.admit(1, Duration::from_secs(10)).await.unwrap();
                    admitted.lock().unwrap().push("one");
                })
            })
            .collect();
        several.await.unwrap();
        for single in singles {
            single.await.unwrap();
        }
        let order = admitted.lock().unwrap().clone();
        assert_eq!(order.first(), Some(&"several"), "{order:?}");
        assert_eq!(order.len(), 7);

        // Someone in line: no call is taken past them, and whoever may not wait is deferred.
        let budget = Budgets::new(Some(Arc::new(ReasoningBudget::new(1.0, 3))), None);
        assert!(budget.try_admit(3).is_ok());
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.admit(3, Duration::from_secs(10)).await }
        });
        until_someone_holds_the_turn(&budget).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(budget.try_admit(1).is_err(), "a call has refilled, but it is the waiting item's");
        assert!(budget.admit(1, Duration::ZERO).await.is_err());
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(budget.line.waiting.load(Ordering::SeqCst), 0, "a cancelled admission leaves the line");
        assert!(budget.try_admit(1).is_ok(), "the refilled call is free again");
    }

    /// Queued work waiting for its own share waits outside the line: requests take what the shared buckets hold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_work_waiting_for_its_share_does_not_hold_the_line() {
        let shared = Budgets::new(Some(Arc::new(ReasoningBudget::new(1.0, 10))), None);
        let queue = shared.for_queue(0.1);
        assert!(queue.try_admit(1).is_ok(), "the lane's one call");
        let queued = tokio::spawn({
            let queue = queue.clone();
            async move { queue.admit(1, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(shared.line.waiting.load(Ordering::SeqCst), 0, "not in line while its lane refills");
        assert!(shared.admit(1, Duration::ZERO).await.is_ok(), "a request takes a shared call at once");
        queued.abort();
    }

    /// A wait too long to add to the clock still waits, instead of reading as "do not wait".
    #[tokio::test]
    async fn a_huge_wait_still_waits() {
        let budget = Budgets::new(Some(Arc::new(ReasoningBudget::new(10.0, 1))), None);
        assert!(budget.admit(1, Duration::ZERO).await.is_ok());
        assert!(budget.admit(1, Duration::ZERO).await.is_err(), "spent, and told not to wait");
        let started = Instant::now();
        assert!(budget.admit(1, Duration::MAX).await.is_ok());
        assert!(started.elapsed() >= Duration::from_millis(90), "{:?}", started.elapsed());
    }

    #[test]
    fn a_request_larger_than_the_burst_is_admitted_when_full_and_pays_in_full() {
        let budget = ReasoningBudget::new(1.0, 2);
        let t0 = Instant::now();
        assert!(budget.try_take_at(5, t0).is_ok());
        // Five calls were made on a two-call bucket: three are owed, then the next needs its two.
        let wait = budget.try_take_at(1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 4.0).abs() < 1e-6, "{wait:?}");
        assert!(budget.try_take_at(5, t0 + Duration::from_secs(4)).is_err());
        assert!(budget.try_take_at(5, t0 + Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn refusals_take_nothing_and_calls_given_back_return_up_to_the_burst() {
        let budget = ReasoningBudget::new(1.0, 1);
        let t0 = Instant::now();
        budget.take_owed(2);
        let wait = budget.try_take_at(1, t0).unwrap_err();
        assert!(wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2), "{wait:?}");
        let again = budget.try_take_at(1, t0).unwrap_err();
        assert!(again >= wait - Duration::from_millis(100), "a refusal took nothing: {again:?}");
        assert!(budget.try_take_at(0, t0).unwrap_err() > Duration::from_millis(900), "in debt, even nothing waits");
        budget.give_back(5);
        assert!(budget.try_take(1).is_ok(), "given back, up to the burst");
        assert!(budget.try_take(1).is_err(), "never above the burst of 1");
    }

    #[test]
    fn an_absurd_charge_leaves_at_most_an_hour_of_debt() {
        let budget = ReasoningBudget::new(1000.0, 1000);
        budget.take_owed(usize::MAX);
        let wait = budget.try_take(0).unwrap_err();
        assert!(wait <= MAX_RETRY_AFTER && wait > MAX_RETRY_AFTER - Duration::from_secs(1), "{wait:?}");
        let later = Instant::now() + MAX_RETRY_AFTER + Duration::from_secs(1);
        assert!(budget.try_take_at(0, later).is_ok(), "an hour later the budget admits again");
        // A rate so slow that an hour refills less than a burst: the floor is one burst.
        let slow = ReasoningBudget::new(0.0001, 2);
        slow.take_owed(usize::MAX);
        let wait = slow.try_take(1).unwrap_err();
        assert!((wait.as_secs_f64() - 3.0 / 0.0001).abs() < 10.0, "two of debt and one to take: {wait:?}");
        // Debt a real charge makes is kept in full.
        let fair = ReasoningBudget::new(100.0, 100);
        fair.take_owed(8192 + 2000);
        let wait = fair.try_take(0).unwrap_err();
        assert!(wait > Duration::from_secs(100), "about 101 s of debt: {wait:?}");
    }

    #[test]
    fn owed_calls_are_always_granted_and_delay_the_next_item() {
        let budget = ReasoningBudget::new(2.0, 2);
        let t0 = Instant::now();
        assert!(budget.try_take_at(2, t0).is_ok());
        budget.take_owed(3);
        let wait = budget.try_take_at(1, Instant::now()).unwrap_err();
        assert!(wait > Duration::from_millis(1900), "three owed calls plus one at 2/s: {wait:?}");
    }

    #[test]
    fn queued_work_keeps_to_its_share_and_leaves_the_rest_to_others() {
        let shared = Budgets::new(Some(Arc::new(ReasoningBudget::new(4.0, 4))), None);
        let queue = shared.for_queue(0.5);
        assert!(queue.try_admit(1).is_ok() && queue.try_admit(1).is_ok(), "the lane's burst is half the bucket's");
        let wait = queue.try_admit(1).unwrap_err();
        assert!(wait > Duration::from_millis(400), "the lane refills at 2/s: {wait:?}");
        assert!(shared.try_admit(1).is_ok() && shared.try_admit(1).is_ok(), "the other half is left for requests");
        assert!(shared.try_admit(1).is_err());
        assert!(Budgets::default().for_queue(0.5).is_unlimited() && shared.for_queue(1.0).queue_lane.is_none());
    }

    #[test]
    fn a_refusal_by_the_shared_bucket_takes_nothing_from_the_lane() {
        let shared = Budgets::new(
            Some(Arc::new(ReasoningBudget::new(1.0, 1))),
            Some(Arc::new(ReasoningBudget::new(100.0, 100))),
        );
        let queue = shared.for_queue(0.5);
        assert!(shared.try_admit(1).is_ok());
        assert!(queue.try_admit(1).is_err(), "the shared call is spent");
        shared.give_back_calls(1);
        assert!(queue.try_admit(1).is_ok(), "the lane's one call was given back after the refusal");

        // Tokens a queued step spent are paid from both: the lane goes into debt first.
        queue.give_back_calls(1);
        queue.charge(60);
        assert!(queue.try_admit(1).is_err(), "60 tokens on a 50-token lane");
        assert!(shared.try_admit(1).is_ok(), "40 tokens are left in the shared bucket");
    }
}
