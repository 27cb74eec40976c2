//! `cargo run --release -p safeguard-triage --example route_speed -- ../shared/data [ROUNDS]`: single-thread
//! `Triage::route` throughput (featurize + dot + Platt + bands) with the default model trained on ToxicChat
//! train, on short texts (Davidson tweets) and ToxicChat test prompts. Prints every round and the best, since
//! on a shared machine the slower rounds measure the neighbours; also the load average before and after.
use std::time::{Duration, Instant};

use safeguard_triage::bench::{DAVIDSON, TOXICCHAT_TEST, TOXICCHAT_TRAIN};
use safeguard_triage::{DatasetFields, FeatureConfig, FitOptions, Triage, fit, load_dataset};

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Nanoseconds this thread has run on a CPU (Linux `schedstat`), so that rates can be taken over time actually
/// spent running rather than over wall time that includes waiting for a core on a shared machine.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split(' ').next()?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "../shared/data".into()));
    let rounds: usize = std::env::args().nth(2).and_then(|r| r.parse().ok()).unwrap_or(5);
    let fields = DatasetFields::default();
    let train = load_dataset(&dir.join(TOXICCHAT_TRAIN), &fields, 0)?;
    let texts = |path: &str, n: usize| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        Ok(load_dataset(&dir.join(path), &fields, 0)?.examples.into_iter().take(n).map(|e| e.text).collect())
    };
    let sets = [("davidson tweets", texts(DAVIDSON, 5000)?), ("toxicchat test", texts(TOXICCHAT_TEST, usize::MAX)?)];
    println!("load average before: {}", load_average());
    for (name, features) in [("words+chars+length", FeatureConfig::default()), ("words", FeatureConfig::words_only())] {
        let options = FitOptions { features, ..FitOptions::default() };
        let triage = Triage::new(None, Some(fit(&train.examples, vec![train.provenance.clone()], &options)?));
        for (set, texts) in &sets {
            let mut best = 0.0f64;
            let mut best_cpu = 0.0f64;
            let mut all = Vec::new();
            for _ in 0..rounds {
                let (mut items, mut sink) = (0usize, 0.0f32);
                let start = Instant::now();
                let cpu_start = thread_cpu_ns();
                while start.elapsed() < Duration::from_millis(700) {
                    for t in texts {
                        sink += triage.route(t).calibrated_probability.unwrap_or(0.0);
                    }
                    items += texts.len();
                }
                std::hint::black_box(sink);
                let rate = items as f64 / start.elapsed().as_secs_f64();
                if let (Some(a), Some(b)) = (cpu_start, thread_cpu_ns()) {
                    best_cpu = best_cpu.max(items as f64 / ((b - a) as f64 * 1e-9));
                }
                best = best.max(rate);
                all.push(format!("{:.0}k", rate / 1e3));
            }
            println!(
                "{name:<20} {set:<16} best {:>8.0} items/s wall ({:>8.0} per CPU-second)  rounds {}",
                best,
                best_cpu,
                all.join(" ")
            );
        }
    }
    println!("load average after: {}", load_average());
    Ok(())
}
