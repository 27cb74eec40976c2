//! `safeguard webhooks`: the job webhooks a server gave up on (its receiver stayed down past every retry), and
//! sending them again.

use std::process::ExitCode;

use super::keys::StoreArgs;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List deliveries given up on, the most recent first: id, job, URL, attempts, last HTTP status and error.
    Failed {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Queue failed deliveries again, due now with a fresh run of attempts; a running server sends them.
    Retry {
        /// Only this job's failed deliveries (its job.completed, and a job.reviewed per person's answer).
        #[arg(long, value_name = "ID", conflicts_with = "all", required_unless_present = "all")]
        job: Option<String>,
        /// Every failed delivery.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    super::classify::runtime()?.block_on(async move {
        match command {
            Command::Failed { limit, store } => {
                let store = store.open().await?;
                let failed = store.failed_deliveries(i64::from(limit)).await?;
                for delivery in &failed {
                    let status = delivery.last_status.map_or_else(|| "-".to_string(), |s| s.to_string());
                    let error = delivery.last_error.as_deref().unwrap_or("-");
                    // A job has several deliveries (job.completed, a job.reviewed per person's answer).
                    let event = serde_json::from_str::<serde_json::Value>(&delivery.body)
                        .ok()
                        .and_then(|body| body.get("type").and_then(|t| t.as_str()).map(str::to_string))
                        .unwrap_or_else(|| "-".to_string());
                    println!(
                        "{}\t{}\t{event}\t{}\t{}\t{status}\t{error}",
                        delivery.id, delivery.job_id, delivery.url, delivery.attempts
                    );
                }
                eprintln!("{} failed deliveries", failed.len());
            }
            Command::Retry { job, all: _, store } => {
                let store = store.open().await?;
                let queued = store.retry_failed_deliveries(job.as_deref()).await?;
                if queued == 0 {
                    let which = job.map_or_else(String::new, |job| format!(" for job {job}"));
                    eprintln!("no failed delivery{which}");
                    return Ok(ExitCode::from(super::EXIT_FAILURE));
                }
                eprintln!("queued {queued} deliveries again; a running server sends them");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
