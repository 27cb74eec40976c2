//! `safeguard triage audit`: how often triage is wrong on live traffic, from what reviewers answered on the
//! uniform audit the server draws of the items triage settled alone (`--triage-audit-rate`, reviews of kind
//! `audit`). Per policy version and triage model: how many of its allows people found violating (its misses) and
//! how many of its violations they allowed, each with a 95 % interval.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use safeguard_pipeline::cascade::Stage;
use safeguard_store::{ExportCursor, ExportRange, Store};
use serde::Serialize;

use super::classify::runtime;
use super::export::{Skipped, corrections, parse_since};
use super::keys::StoreArgs;
use super::triage::Format;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// The server's store: its --data-dir, or --database (and --database-schema) as given to `safeguard serve`.
    #[command(flatten)]
    store: StoreArgs,
    /// Only this policy's audits.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// Only audits decided, or of decisions made, at or after this time: RFC 3339 or unix milliseconds.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// What people found among the audited items one triage model settled one way under one policy version.
#[derive(Debug, Serialize)]
struct AuditRow {
    policy: String,
    policy_hash: String,
    /// The weights sha256 of the triage model; `None` where rules alone settled the items.
    triage_model: Option<String>,
    /// What triage had said: "allow" or "violation".
    triage_said: &'static str,
    audited: u64,
    /// How many of them people decided the other way.
    overturned: u64,
    /// `overturned / audited`, with its 95 % Wilson interval (honest at small counts and at zero).
    error_rate: f64,
    interval: [f64; 2],
}

type Key = (String, String, Option<String>, &'static str);

pub fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let since = args.since.as_deref().map(parse_since).transpose()?;
    let rows = runtime()?.block_on(async {
        let store = args.store.open().await?;
        let rows = tally(&store, since, args.policy.as_deref()).await;
        store.close().await;
        rows
    })?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Text if rows.is_empty() => {
            println!("no decided audits of triage yet (serve with --triage-audit-rate above 0, then review them)")
        }
        Format::Text => print_table(&rows),
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the decided reviews a page at a time and counts the audits among them.
async fn tally(store: &Store, since: Option<i64>, policy: Option<&str>) -> anyhow::Result<Vec<AuditRow>> {
    let range = ExportRange { since, through: None };
    let mut counts: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
    let mut skipped = Skipped::default();
    let mut after: Option<ExportCursor> = None;
    loop {
        let page = store.decided_reviews_page(&range, after.as_ref()).await.context("reading decided reviews")?;
        for (review, decision) in page.rows.iter().filter(|(review, _)| review.kind == "audit") {
            // The text is not needed to count; the policies the person's answer applies to are.
            for correction in corrections(review, decision, "", &mut skipped) {
                let Some(corrected) = correction.corrects.filter(|c| c.stage == Stage::Triage) else { continue };
                let triage_said = match corrected.violates {
                    Some(1) => "violation",
                    Some(_) => "allow",
                    None => continue,
                };
                if policy.is_some_and(|name| name != correction.policy) {
                    continue;
                }
                let key = (correction.policy, correction.policy_hash, corrected.triage_model, triage_said);
                let (audited, overturned) = counts.entry(key).or_default();
                *audited += 1;
                *overturned += u64::from(correction.violates != (triage_said == "violation"));
            }
        }
        if page.last || page.end.is_none() {
            break;
        }
        after = page.end;
    }
    skipped.report();
    Ok(counts
        .into_iter()
        .map(|((policy, policy_hash, triage_model, triage_said), (audited, overturned))| AuditRow {
            error_rate: overturned as f64 / audited as f64,
            interval: wilson_interval(overturned, audited),
            policy,
            policy_hash,
            triage_model,
            triage_said,
            audited,
            overturned,
        })
        .collect())
}

/// The 95 % Wilson score interval of a proportion `k / n`: unlike the normal approximation it stays inside
/// [0, 1] and does not collapse to a point at 0 of 200, which is what a good triage model shows.
fn wilson_interval(k: u64, n: u64) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let z = 1.959_964_f64;
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2n = z * z / n;
    let centre = (p + z2n / 2.0) / (1.0 + z2n);
    let half = z * (p * (1.0 - p) / n + z2n / (4.0 * n)).sqrt() / (1.0 + z2n);
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

fn print_table(rows: &[AuditRow]) {
    println!(
        "{:<20} {:<14} {:<14} {:<10} {:>8} {:>11} {:>8}  95% interval",
        "policy", "version", "triage model", "triage", "audited", "overturned", "rate"
    );
    for row in rows {
        let short = |text: &str| text.trim_start_matches("sha256:").chars().take(12).collect::<String>();
        println!(
            "{:<20} {:<14} {:<14} {:<10} {:>8} {:>11} {:>7.1}%  {:.1}%–{:.1}%",
            row.policy,
            short(&row.policy_hash),
            row.triage_model.as_deref().map_or_else(|| "rules".to_string(), short),
            row.triage_said,
            row.audited,
            row.overturned,
            row.error_rate * 100.0,
            row.interval[0] * 100.0,
            row.interval[1] * 100.0,
        );
    }
    println!("(\"overturned\" among triage's allows are its misses: violations that reached nobody)");
}

#[cfg(test)]
mod tests {
    use super::wilson_interval;

    #[test]
    fn the_wilson_interval_matches_known_values_and_stays_in_range() {
        let close = |got: f64, want: f64| (got - want).abs() < 5e-4;
        // 0 of 200: no misses seen, yet up to 1.9 % is not ruled out.
        let [low, high] = wilson_interval(0, 200);
        assert!(close(low, 0.0) && close(high, 0.0188), "{low} {high}");
        // 10 of 100: [0.0552, 0.1744], the textbook value.
        let [low, high] = wilson_interval(10, 100);
        assert!(close(low, 0.0552) && close(high, 0.1744), "{low} {high}");
        let [low, high] = wilson_interval(5, 5);
        assert!(close(high, 1.0) && low > 0.5 && low < 0.6, "{low} {high}");
        assert_eq!(wilson_interval(0, 0), [0.0, 1.0]);
    }
}
