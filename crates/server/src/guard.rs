//! Wraps any reasoner with a deadline and error accounting, so a hung or failing backend becomes a
//! `needs_review` decision (through the classifier's error path) instead of a hung request.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use safeguard_core::{DeltaSender, EndpointHealth, ReasonError, ReasonOutput, ReasonRequest, Reasoner};
use safeguard_harmony::Effort;

pub struct GuardedReasoner {
    inner: Arc<dyn Reasoner>,
    timeout: Duration,
}

impl GuardedReasoner {
    pub fn new(inner: Arc<dyn Reasoner>, timeout: Duration) -> Self {
        GuardedReasoner { inner, timeout }
    }

    fn timed_out(&self) -> ReasonError {
        metrics::counter!("safeguard_backend_errors_total", "kind" => "timeout").increment(1);
        ReasonError::Backend(format!("the reasoner timed out after {:.1} s", self.timeout.as_secs_f64()))
    }
}

fn count_error<T>(result: &Result<T, ReasonError>) {
    if result.is_err() {
        metrics::counter!("safeguard_backend_errors_total", "kind" => "error").increment(1);
    }
}

#[async_trait]
impl Reasoner for GuardedReasoner {
    fn model_id(&self) -> String {
        self.inner.model_id()
    }

    fn backends(&self) -> Option<Vec<EndpointHealth>> {
        self.inner.backends()
    }

    async fn probe_backends(&self) {
        self.inner.probe_backends().await;
    }

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        match safeguard_core::deadline::within(self.timeout, self.inner.reason(req)).await {
            Ok(result) => {
                count_error(&result);
                result
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn reason_streaming(&self, req: ReasonRequest, deltas: DeltaSender) -> Result<ReasonOutput, ReasonError> {
        match safeguard_core::deadline::within(self.timeout, self.inner.reason_streaming(req, deltas)).await {
            Ok(result) => {
                count_error(&result);
                result
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    fn batch_width(&self) -> Option<usize> {
        self.inner.batch_width()
    }

    fn completion_cap(&self, effort: Effort) -> usize {
        self.inner.completion_cap(effort)
    }

    fn context_tokens(&self) -> Option<usize> {
        self.inner.context_tokens()
    }

    /// The deadline holds per group the backend decodes at once ([`Reasoner::batch_width`]), not for the whole
    /// batch: a batch of 256 items on an engine that decodes 8 at a time takes 32 turns, and one deadline for all
    /// of them would time every item out. Once a group has timed out, the rest of the batch is not tried: a
    /// backend too slow for one group's deadline would most likely miss the next ones too, one deadline after
    /// another, while the caller waits. (The timed-out group itself stops decoding: the embedded engine at its
    /// next step through the requests' cancel flag, a remote server when its request is dropped.)
    async fn reason_batch(&self, reqs: Vec<ReasonRequest>) -> Vec<Result<ReasonOutput, ReasonError>> {
        let width = self.inner.batch_width().unwrap_or(reqs.len()).max(1);
        let mut results = Vec::with_capacity(reqs.len());
        let mut reqs = reqs.into_iter().peekable();
        let mut timed_out = false;
        while reqs.peek().is_some() {
            let group: Vec<ReasonRequest> = reqs.by_ref().take(width).collect();
            let count = group.len();
            if timed_out {
                let not_tried = || ReasonError::Backend("not tried: an earlier part of the batch timed out".into());
                results.extend((0..count).map(|_| Err(not_tried())));
                continue;
            }
            match safeguard_core::deadline::within(self.timeout, self.inner.reason_batch(group)).await {
                // Answers are matched to requests by position: a group answered with too few or too many would
                // shift every later answer onto another request, another policy's verdict. None of it can be
                // trusted then.
                Ok(done) if done.len() != count => {
                    tracing::error!(expected = count, got = done.len(), "a reasoner answered a batch miscounted");
                    let got = done.len();
                    let miscounted = || Err(ReasonError::EngineResultCount { expected: count, got });
                    let failed: Vec<_> = (0..count).map(|_| miscounted()).collect();
                    failed.iter().for_each(count_error);
                    results.extend(failed);
                }
                Ok(done) => {
                    done.iter().for_each(count_error);
                    results.extend(done);
                }
                Err(_) => {
                    timed_out = true;
                    results.extend((0..count).map(|_| Err(self.timed_out())));
                }
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safeguard_harmony::Content;

    /// Answers the group holding "policy 0" with one result fewer than it was asked for, as a broken backend
    /// might, and every other group in full, each answer naming its request.
    struct ShortAnswers;

    #[async_trait]
    impl Reasoner for ShortAnswers {
        fn model_id(&self) -> String {
            "short".into()
        }

        async fn reason(&self, _req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
            Ok(ReasonOutput::default())
        }

        fn batch_width(&self) -> Option<usize> {
            Some(2)
        }

        async fn reason_batch(&self, reqs: Vec<ReasonRequest>) -> Vec<Result<ReasonOutput, ReasonError>> {
            let short = reqs.iter().any(|req| req.instructions == "policy 0");
            let answer = |req: &ReasonRequest| {
                Ok(ReasonOutput { final_text: Some(req.instructions.clone()), ..Default::default() })
            };
            reqs.iter().skip(usize::from(short)).map(answer).collect()
        }
    }

    #[tokio::test]
    async fn a_miscounted_group_fails_whole_and_keeps_later_answers_in_place() {
        let guarded = GuardedReasoner::new(Arc::new(ShortAnswers), Duration::from_secs(5));
        let item = || Content::Text { text: "hello".into() };
        let reqs = (0..4).map(|i| ReasonRequest::new(format!("policy {i}"), item(), Effort::Low)).collect();
        let results = guarded.reason_batch(reqs).await;
        assert_eq!(results.len(), 4, "one result per request, whatever the backend did");
        assert!(
            results[..2].iter().all(|r| matches!(r, Err(ReasonError::EngineResultCount { expected: 2, got: 1 }))),
            "{results:?}"
        );
        let later: Vec<Option<String>> =
            results[2..].iter().map(|r| r.as_ref().ok().and_then(|o| o.final_text.clone())).collect();
        assert_eq!(later, [Some("policy 2".to_string()), Some("policy 3".to_string())], "answers stay in place");
    }
}
