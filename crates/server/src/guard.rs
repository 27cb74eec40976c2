//! Wraps any reasoner with a deadline and error accounting, so a hung or failing backend becomes a
//! `needs_review` decision (through the classifier's error path) instead of a hung request.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use safeguard_core::{DeltaSender, ReasonError, ReasonOutput, ReasonRequest, Reasoner};

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

    async fn reason(&self, req: ReasonRequest) -> Result<ReasonOutput, ReasonError> {
        match tokio::time::timeout(self.timeout, self.inner.reason(req)).await {
            Ok(result) => {
                count_error(&result);
                result
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn reason_streaming(&self, req: ReasonRequest, deltas: DeltaSender) -> Result<ReasonOutput, ReasonError> {
        match tokio::time::timeout(self.timeout, self.inner.reason_streaming(req, deltas)).await {
            Ok(result) => {
                count_error(&result);
                result
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn reason_batch(&self, reqs: Vec<ReasonRequest>) -> Vec<Result<ReasonOutput, ReasonError>> {
        let count = reqs.len();
        match tokio::time::timeout(self.timeout, self.inner.reason_batch(reqs)).await {
            Ok(results) => {
                results.iter().for_each(count_error);
                results
            }
            Err(_) => (0..count).map(|_| Err(self.timed_out())).collect(),
        }
    }
}
