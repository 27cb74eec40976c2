//! Token choice from raw logits, in plain Rust so that it is identical on every backend and testable without a model.

use crate::{EngineError, Sampling};

/// A picked token and the probability the model's untempered softmax gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub token: u32,
    pub prob: f32,
}

/// Per-request sampling state: the seeded random stream lives as long as the request.
#[derive(Debug, Clone)]
pub struct Sampler {
    mode: Mode,
}

#[derive(Debug, Clone)]
enum Mode {
    Greedy,
    Seeded { rng: SplitMix64, temperature: f32, top_p: f32 },
}

impl Sampler {
    pub fn new(sampling: &Sampling, engine_seed: u32) -> Result<Self, EngineError> {
        let mode = match *sampling {
            Sampling::Greedy => Mode::Greedy,
            Sampling::Seeded { seed, temperature, top_p } => {
                if !temperature.is_finite() || temperature < 0.0 {
                    return Err(EngineError::InvalidRequest(format!(
                        "temperature must be a finite number >= 0, got {temperature}"
                    )));
                }
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return Err(EngineError::InvalidRequest(format!("top_p must be in (0, 1], got {top_p}")));
                }
                if temperature == 0.0 {
                    Mode::Greedy
                } else {
                    let state = (u64::from(seed) << 32) | u64::from(engine_seed);
                    Mode::Seeded { rng: SplitMix64(state), temperature, top_p }
                }
            }
        };
        Ok(Sampler { mode })
    }

    pub fn pick(&mut self, logits: &[f32]) -> Pick {
        let token = match &mut self.mode {
            Mode::Greedy => argmax(logits),
            Mode::Seeded { rng, temperature, top_p } => sample(logits, *temperature, *top_p, rng.next_f64()),
        };
        Pick { token, prob: softmax_prob(logits, token) }
    }
}

/// Index of the largest logit; the lowest index wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best_value = v;
            best = i;
        }
    }
    best as u32
}

/// Softmax probability of `token`, computed in f64 so that it does not underflow for large vocabularies.
pub fn softmax_prob(logits: &[f32], token: u32) -> f32 {
    let Some(&chosen) = logits.get(token as usize) else {
        return 0.0;
    };
    let max = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || !chosen.is_finite() {
        return 0.0;
    }
    let sum: f64 = logits.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v - max).exp()).sum();
    (f64::from(chosen - max).exp() / sum) as f32
}

/// Draw from softmax(logits / temperature) restricted to the smallest top set with mass >= top_p.
/// `uniform` is a draw in [0, 1). Candidates are walked in id order, so the draw is reproducible.
fn sample(logits: &[f32], temperature: f32, top_p: f32, uniform: f64) -> u32 {
    let max = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(logits);
    }
    let inv_t = 1.0 / f64::from(temperature);
    let weights: Vec<f64> =
        logits.iter().map(|&v| if v.is_finite() { (f64::from(v - max) * inv_t).exp() } else { 0.0 }).collect();
    let cutoff = if top_p >= 1.0 { 0.0 } else { nucleus_cutoff(&weights, f64::from(top_p)) };
    let kept = |w: f64| w > 0.0 && w >= cutoff;
    let kept_total: f64 = weights.iter().copied().filter(|&w| kept(w)).sum();
    let target = uniform * kept_total;
    let mut acc = 0.0;
    let mut last_kept = None;
    for (id, &w) in weights.iter().enumerate() {
        if kept(w) {
            acc += w;
            last_kept = Some(id as u32);
            if acc > target {
                return id as u32;
            }
        }
    }
    // Rounding can leave `target` a hair above the final sum: take the last candidate.
    last_kept.unwrap_or_else(|| argmax(logits))
}

/// The smallest weight inside the nucleus: the top weights, largest first, until their mass reaches
/// `top_p` of the total. Sorting the plain values (not ids) keeps this cheap for a 200k vocabulary.
fn nucleus_cutoff(weights: &[f64], top_p: f64) -> f64 {
    let mut sorted: Vec<f64> = weights.iter().copied().filter(|&w| w > 0.0).collect();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let total: f64 = sorted.iter().sum();
    let mut mass = 0.0;
    for &w in &sorted {
        mass += w;
        if mass >= top_p * total {
            return w;
        }
    }
    sorted.last().copied().unwrap_or(0.0)
}

/// A tiny, fully specified PRNG: its stream must never change with a dependency upgrade, or seeded runs stop repeating.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_lowest_index_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN]), 1);
    }

    #[test]
    fn softmax_prob_matches_closed_form() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()];
        assert!((softmax_prob(&logits, 2) - 0.5).abs() < 1e-6);
        assert!((softmax_prob(&logits, 0) - 1.0 / 6.0).abs() < 1e-6);
        assert_eq!(softmax_prob(&logits, 9), 0.0);
    }

    #[test]
    fn softmax_prob_survives_huge_vocab_and_extreme_logits() {
        let mut logits = vec![-1000.0f32; 201_088];
        logits[7] = 1000.0;
        assert!((softmax_prob(&logits, 7) - 1.0).abs() < 1e-6);
        assert_eq!(softmax_prob(&logits, 8), 0.0);
    }

    #[test]
    fn greedy_picks_argmax_with_its_probability() {
        let mut sampler = Sampler::new(&Sampling::Greedy, 0).unwrap();
        let pick = sampler.pick(&[0.0, 1.0, 0.0]);
        assert_eq!(pick.token, 1);
        let expected = 1f32.exp() / (2.0 + 1f32.exp());
        assert!((pick.prob - expected).abs() < 1e-6);
    }

    #[test]
    fn seeded_sampling_repeats_for_a_seed_and_varies_across_seeds() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(&Sampling::Seeded { seed, temperature: 1.0, top_p: 1.0 }, 0).unwrap();
            (0..40).map(|_| s.pick(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 3 holds ~88% of the mass: with top_p 0.5 it is the only candidate.
        let logits = [0.0f32, 0.0, 0.0, 3.0];
        let mut s = Sampler::new(&Sampling::Seeded { seed: 9, temperature: 1.0, top_p: 0.5 }, 0).unwrap();
        for _ in 0..100 {
            assert_eq!(s.pick(&logits).token, 3);
        }
    }

    #[test]
    fn sampling_frequencies_follow_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(&Sampling::Seeded { seed: 5, temperature: 1.0, top_p: 1.0 }, 0).unwrap();
        let ones = (0..4000).filter(|_| s.pick(&logits).token == 1).count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn zero_temperature_is_greedy_and_bad_parameters_are_rejected() {
        let mut s = Sampler::new(&Sampling::Seeded { seed: 1, temperature: 0.0, top_p: 1.0 }, 0).unwrap();
        assert_eq!(s.pick(&[0.0, 0.1, 5.0, 0.2]).token, 2);
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let r = Sampler::new(&Sampling::Seeded { seed: 1, temperature: t, top_p: p }, 0);
            assert!(matches!(r, Err(EngineError::InvalidRequest(_))), "{t} {p}");
        }
    }
}
