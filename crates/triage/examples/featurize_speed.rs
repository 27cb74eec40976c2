//! `cargo run --release -p safeguard-triage --example featurize_speed [DATA_DIR]`: single-thread featurizer
//! throughput on short texts (Davidson tweets) by feature set and hash-table size.
use std::time::Duration;

use safeguard_triage::bench::{DAVIDSON, throughput};
use safeguard_triage::{DatasetFields, FeatureConfig, Featurizer, load_dataset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "../shared/data".into()));
    let texts: Vec<String> = load_dataset(&dir.join(DAVIDSON), &DatasetFields::default(), 0)?
        .examples
        .into_iter()
        .take(5000)
        .map(|e| e.text)
        .collect();
    for (name, base) in [("words", FeatureConfig::words_only()), ("words+chars3-5", FeatureConfig::default())] {
        for bits in [16, 18, 20] {
            let f = Featurizer::new(FeatureConfig { hash_bits: bits, ..base.clone() })?;
            let weights: Vec<f32> = (0..1usize << bits).map(|i| (i % 7) as f32 - 3.0).collect();
            // Summing buckets keeps the hashing from being optimized away.
            let count = throughput(&texts, Duration::from_secs(1), |t| {
                let mut acc = 0usize;
                f.for_each_feature(t, |b, _| acc ^= b);
                acc as f32
            });
            let dot = throughput(&texts, Duration::from_secs(1), |t| f.dot(t, &weights));
            println!("{name:<16} 2^{bits}: hash only {count:>10.0} items/s, dot {dot:>10.0} items/s");
        }
    }
    Ok(())
}
