//! `safeguard triage audit`: how often triage is wrong on live traffic, from what reviewers answered on the
//! uniform audit the server draws of the items triage settled alone (`--triage-audit-rate`, reviews of kind
//! `audit`). Per policy version and triage model: how many of its allows people found violating (its misses) and
//! how many of its violations they allowed, each with a 95 % interval.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use safeguard_pipeline::cascade::Stage;
use safeguard_store::{AuditState, DecisionRecord, ExportCursor, ExportRange, ReviewRecord, Store};
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
    /// When that model was trained: one set of weights recalibrated is another model, with other thresholds.
    triage_model_created: Option<String>,
    /// What triage had said: "allow" or "violation".
    triage_said: &'static str,
    audited: u64,
    /// How many of them people decided the other way.
    overturned: u64,
    /// How many of the audited items were answered on appeal: the user appealed before the audit was reviewed,
    /// and the person who decided the appeal judged the same item under the same policy version.
    answered_on_appeal: u64,
    /// `overturned / audited`, with its 95 % Wilson interval (honest at small counts and at zero).
    error_rate: f64,
    interval: [f64; 2],
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    policy: String,
    policy_hash: String,
    triage_model: Option<(String, Option<String>)>,
    triage_said: &'static str,
}

#[derive(Default)]
struct Tally {
    counts: BTreeMap<Key, Count>,
    skipped: Skipped,
}

#[derive(Debug, Default)]
struct Count {
    audited: u64,
    overturned: u64,
    answered_on_appeal: u64,
}

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

/// Reads the audits a page at a time, only those, and counts what people answered. An audit a user's appeal
/// superseded counts with the appeal's answer: the item was drawn uniformly before anyone appealed it, and
/// leaving it out would hide exactly the triage violations users disputed, the likeliest to be wrong.
async fn tally(store: &Store, since: Option<i64>, policy: Option<&str>) -> anyhow::Result<Vec<AuditRow>> {
    let mut tally = Tally::default();
    let range = ExportRange { since, through: None };
    let mut after: Option<ExportCursor> = None;
    loop {
        let page = store.audits_page(AuditState::Decided, &range, after.as_ref()).await.context("reading audits")?;
        for (audit, decision) in &page.rows {
            tally_answer(&mut tally, policy, audit, audit, decision);
        }
        if page.last || page.end.is_none() {
            break;
        }
        after = page.end;
    }

    let mut awaiting_appeal = 0;
    let mut after: Option<ExportCursor> = None;
    loop {
        let page = store
            .audits_page(AuditState::Superseded, &ExportRange::default(), after.as_ref())
            .await
            .context("reading audits superseded by appeals")?;
        for (audit, decision) in &page.rows {
            if policy.is_some_and(|name| !audits_policy(audit, decision, name)) {
                continue;
            }
            let appeal = store.appeal_of(&decision.id).await.context("reading an audited item's appeal")?;
            let appeal = match appeal {
                Some(appeal) if appeal.status == "decided" => appeal,
                Some(_) => {
                    awaiting_appeal += 1;
                    continue;
                }
                None => {
                    tally.skipped.add("the appeal that set the audit aside is gone (pruned)");
                    continue;
                }
            };
            let answered = appeal.decided_at.unwrap_or(i64::MIN);
            if since.is_some_and(|since| answered < since && decision.created_at < since) {
                continue;
            }
            tally_answer(&mut tally, policy, audit, &appeal, decision);
        }
        if page.last || page.end.is_none() {
            break;
        }
        after = page.end;
    }
    tally.skipped.report();
    if awaiting_appeal > 0 {
        eprintln!("  not counted yet: {awaiting_appeal} audited items whose appeal no one has answered");
    }
    Ok(tally
        .counts
        .into_iter()
        .map(|(key, count)| AuditRow {
            error_rate: count.overturned as f64 / count.audited as f64,
            interval: wilson_interval(count.overturned, count.audited),
            policy: key.policy,
            policy_hash: key.policy_hash,
            triage_model_created: key.triage_model.as_ref().and_then(|(_, created)| created.clone()),
            triage_model: key.triage_model.map(|(sha, _)| sha),
            triage_said: key.triage_said,
            audited: count.audited,
            overturned: count.overturned,
            answered_on_appeal: count.answered_on_appeal,
        })
        .collect())
}

/// Counts one person's answer on an audit: the audit's own, or the appeal's that superseded it.
fn tally_answer(
    tally: &mut Tally,
    policy: Option<&str>,
    audit: &ReviewRecord,
    answer: &ReviewRecord,
    decision: &DecisionRecord,
) {
    // The text is not needed to count; the policies the person's answer applies to are.
    let answered = corrections(answer, decision, "", &mut tally.skipped);
    let answered_any = !answered.is_empty();
    let audited: Vec<_> = answered
        .into_iter()
        .filter(|correction| audit.policy_hash.as_ref().is_none_or(|hash| *hash == correction.policy_hash))
        .collect();
    if audited.is_empty() && answered_any && answer.id != audit.id {
        tally.skipped.add("the appeal's answer is about another policy than the audited one");
    }
    for correction in audited {
        let Some(corrected) = correction.corrects.filter(|c| c.stage == Stage::Triage) else { continue };
        let triage_said = match corrected.violates {
            Some(1) => "violation",
            Some(_) => "allow",
            None => continue,
        };
        if policy.is_some_and(|name| name != correction.policy) {
            continue;
        }
        let key = Key {
            policy: correction.policy,
            policy_hash: correction.policy_hash,
            triage_model: corrected.triage_model.map(|sha| (sha, corrected.triage_model_created)),
            triage_said,
        };
        let count = tally.counts.entry(key).or_default();
        count.audited += 1;
        count.overturned += u64::from(correction.violates != (triage_said == "violation"));
        count.answered_on_appeal += u64::from(answer.id != audit.id);
    }
}

/// Whether `audit` (of `decision`) is of a version of policy `name`: the one it names, or any of the decision's
/// where it names none.
fn audits_policy(audit: &ReviewRecord, decision: &DecisionRecord, name: &str) -> bool {
    let mut versions = decision.policy_names.iter().zip(&decision.policy_hashes);
    versions.any(|(policy, hash)| policy == name && audit.policy_hash.as_ref().is_none_or(|audited| audited == hash))
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
        "{:<20} {:<14} {:<24} {:<10} {:>8} {:>11} {:>10} {:>8}  95% interval",
        "policy", "version", "triage model (trained)", "triage", "audited", "overturned", "on appeal", "rate"
    );
    for row in rows {
        let short = |text: &str| text.trim_start_matches("sha256:").chars().take(12).collect::<String>();
        let model = match (&row.triage_model, &row.triage_model_created) {
            (None, _) => "rules".to_string(),
            (Some(sha), created) => {
                let day = created.as_deref().map_or("", |created| created.get(..10).unwrap_or(created));
                format!("{} {day}", short(sha))
            }
        };
        println!(
            "{:<20} {:<14} {:<24} {:<10} {:>8} {:>11} {:>10} {:>7.1}%  {:.1}%–{:.1}%",
            row.policy,
            short(&row.policy_hash),
            model,
            row.triage_said,
            row.audited,
            row.overturned,
            row.answered_on_appeal,
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
