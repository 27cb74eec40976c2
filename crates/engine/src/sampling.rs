//! Token choice from raw logits, in plain Rust so that it is identical on every backend and testable without a model.

use crate::{EngineError, Sampling};

/// A picked token and the probability the model's untempered softmax gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub token: u32,
    /// The token's probability; NaN when the step had no usable logits (see [`Sampler::pick`]).
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
        // Only a step without one finite logit (NaN from a broken quantization, an fp16 overflow) or with +∞ picks
        // a token whose logit is not finite: decoding on from it would spend the whole budget on noise.
        if !logits.get(token as usize).is_some_and(|logit| logit.is_finite()) {
            return Pick { token, prob: f32::NAN };
        }
        Pick { token, prob: softmax_prob(logits, token) }
    }
}

/// Accumulators the hot loops below keep side by side, so that the compiler turns them into vector instructions:
/// after each decode step every sequence of a batch is picked over the whole vocabulary (201,088 logits for
/// gpt-oss), on the CPU, while a GPU waits for the next step.
const LANES: usize = 16;

/// The largest of the values `keep` accepts (`-inf` if none).
fn max_where(logits: &[f32], keep: impl Fn(f32) -> bool) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if keep(v) && v > *lane { v } else { *lane };
        }
    }
    lanes.iter().chain(rest).copied().fold(f32::NEG_INFINITY, |max, v| if keep(v) && v > max { v } else { max })
}

/// Index of the largest logit; the lowest index wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_where(logits, |_| true);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// `e^x` for `x <= 0` to within 1e-7 relative (Cephes' expf), in plain arithmetic that vectorizes, unlike a call
/// into libm. At -87 and below (`e^-87` is 1.6e-38, near f32's smallest normal) it answers 0, as f32 nearly would.
/// Above 0 its exponent bits would wrap: callers subtract the largest value first.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    debug_assert!(x.is_nan() || x <= 0.0, "exp_nonpositive({x})");
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the low bits of the sum's mantissa.
    const ROUND: f32 = 12_582_912.0;
    const FLOOR: f32 = -87.0;
    let underflows = x.is_nan() || x <= FLOOR;
    let x = if underflows { FLOOR } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    // ln 2 in two parts, so that `k · ln 2` is subtracted without rounding away `r`.
    let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let p =
        ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let two_to_k = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if underflows { 0.0 } else { (p * r * r + r + 1.0) * two_to_k }
}

/// Softmax probability of `token`. Terms are taken relative to the largest finite logit (so none overflows) and
/// summed in f32 blocks added up in f64, to within about 1e-6 relative for a 200k vocabulary.
pub fn softmax_prob(logits: &[f32], token: u32) -> f32 {
    let Some(&chosen) = logits.get(token as usize) else {
        return 0.0;
    };
    let max = max_where(logits, f32::is_finite);
    if !max.is_finite() || !chosen.is_finite() {
        return 0.0;
    }
    let term = |v: f32| if v.is_finite() { exp_nonpositive(v - max) } else { 0.0 };
    let mut sum = 0f64;
    // Blocks short enough that an f32 lane, adding at most 64 terms of at most 1, loses nothing that matters.
    for block in logits.chunks(1024) {
        let mut lanes = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += term(v);
            }
        }
        sum += f64::from(lanes.iter().sum::<f32>() + rest.iter().map(|&v| term(v)).sum::<f32>());
    }
    (f64::from(exp_nonpositive(chosen - max)) / sum) as f32
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
    fn a_step_without_a_finite_logit_picks_nothing_usable() {
        let seeded = Sampling::Seeded { seed: 3, temperature: 1.0, top_p: 1.0 };
        for sampling in [Sampling::Greedy, seeded] {
            let mut sampler = Sampler::new(&sampling, 0).unwrap();
            assert!(sampler.pick(&[f32::NAN; 40]).prob.is_nan(), "{sampling:?}");
            if sampling == Sampling::Greedy {
                assert!(sampler.pick(&[0.5, f32::INFINITY, 0.1]).prob.is_nan(), "+inf is no probability");
            }
            let fine = sampler.pick(&[0.5, f32::NAN, 3.0]);
            assert!(fine.token != 1 && fine.prob > 0.0 && fine.prob <= 1.0, "{sampling:?}: {fine:?}");
        }
    }

    #[test]
    fn argmax_prefers_lowest_index_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0, "nothing larger than -inf: the first");
        assert_eq!(argmax(&[]), 0);
        // Past the vector lanes: a later tie still loses, the maximum is found in the remainder too.
        let mut long = vec![0.5f32; 1000];
        long[700] = 2.0;
        long[701] = 2.0;
        assert_eq!(argmax(&long), 700);
        long[999] = 3.0;
        assert_eq!(argmax(&long), 999);
        long[20] = f32::INFINITY;
        assert_eq!(argmax(&long), 20);
    }

    /// What [`softmax_prob`] computes, the slow and plain way: every term in f64.
    fn softmax_prob_f64(logits: &[f32], token: u32) -> f32 {
        let chosen = logits[token as usize];
        let max = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() || !chosen.is_finite() {
            return 0.0;
        }
        let sum: f64 = logits.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v - max).exp()).sum();
        (f64::from(chosen - max).exp() / sum) as f32
    }

    #[test]
    fn exp_is_within_1e_7_of_libm_down_to_its_floor() {
        let mut worst = 0f64;
        for i in 0..87_000 {
            let x = -(i as f32) / 1000.0;
            let exact = f64::from(x).exp();
            worst = worst.max(((f64::from(exp_nonpositive(x)) - exact) / exact).abs());
        }
        assert!(worst < 1e-7, "{worst:e}");
        assert_eq!(exp_nonpositive(-87.5), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn softmax_prob_agrees_with_f64_over_a_vocabulary_of_logits() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut logits: Vec<f32> = (0..201_088)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        logits[11] = f32::NAN;
        logits[12] = f32::NEG_INFINITY;
        let agree = |logits: &[f32], token: u32| {
            let (fast, exact) = (softmax_prob(logits, token), softmax_prob_f64(logits, token));
            let close = (f64::from(fast) - f64::from(exact)).abs() <= 2e-6 * f64::from(exact) + 1e-37;
            assert!(close, "token {token}: {fast:e} against {exact:e}");
        };
        for scale in [0.01f32, 1.0, 8.0, 40.0, 300.0] {
            let scaled: Vec<f32> = logits.iter().map(|v| v * scale).collect();
            for token in [0u32, 13, 100_000, 201_087, argmax(&scaled)] {
                agree(&scaled, token);
            }
        }
        assert_eq!(softmax_prob(&logits, 11), 0.0, "a NaN logit has no probability");
        logits[40] = f32::INFINITY;
        assert_eq!(softmax_prob(&logits, 40), 0.0, "nor an infinite one");
        agree(&logits, 41);
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
