//! `safeguard prune`: deletes stored decisions, jobs, webhook deliveries and (when asked) unused policy versions
//! older than the retention period. The same pruning runs inside `serve --retain-days`; this is for a schedule of
//! one's own (cron), a first clean-up, or seeing what a period would delete (`--dry-run`).

use std::process::ExitCode;

use anyhow::bail;
use safeguard_store::{Pruned, Retention};

use super::keys::StoreArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Delete what is older than this many days (decisions by when they were made; jobs and webhook deliveries
    /// by when they finished). Items a person still has to decide, and whatever they need, stay.
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(..=36_500))]
    pub older_than_days: u32,
    /// Keep decisions a person reviewed, however old: the corrections `triage train` learns from.
    #[arg(long)]
    pub keep_reviewed: bool,
    /// Also delete policy versions nothing uses any more: not active, named by no kept decision or unfinished
    /// job, and not read by a server to decide with for the whole period (old drafts, versions sent inline).
    #[arg(long)]
    pub policies: bool,
    /// Count what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// `text` (one line) or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// The retention a number of days before now asks for, refusing a period that would delete everything at once.
pub fn retention(days: u32, keep_reviewed: bool, policies: bool) -> anyhow::Result<Retention> {
    if days == 0 {
        bail!("a retention period of 0 days would delete every decision; give 1 or more");
    }
    let before = safeguard_store::now_ms().saturating_sub(i64::from(days) * 86_400_000);
    Ok(Retention { keep_reviewed, policies, ..Retention::before(before) })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let retention = retention(args.older_than_days, args.keep_reviewed, args.policies)?;
    super::classify::runtime()?.block_on(async move {
        let store = args.store.open().await?;
        let counts =
            if args.dry_run { store.count_prunable(&retention).await? } else { store.prune(&retention).await? };
        store.close().await;
        if args.format == "json" {
            let mut value = serde_json::to_value(counts)?;
            value["dry_run"] = args.dry_run.into();
            println!("{value}");
        } else {
            let verb = if args.dry_run { "would delete" } else { "deleted" };
            println!("{verb} {}", describe(&counts, args.policies));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// "3 decisions, 1 job, 0 webhook deliveries" (and policy versions, when they were pruned).
pub fn describe(counts: &Pruned, policies: bool) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut parts = vec![
        plural(counts.decisions, "decision", "decisions"),
        plural(counts.jobs, "job", "jobs"),
        plural(counts.webhook_deliveries, "webhook delivery", "webhook deliveries"),
    ];
    if policies {
        parts.push(plural(counts.policies, "policy version", "policy versions"));
    }
    parts.join(", ")
}
