//! How long picking one token takes over gpt-oss's vocabulary (greedy: argmax and the softmax probability the
//! verdict's confidence comes from), against the plain f64 computation measured in the same run.
//!
//!     cargo run --release -p safeguard-engine --no-default-features --example pick_speed
//!
//! After each decode step every sequence of a batch is picked on the CPU; on a GPU that was longer than the step.

use std::hint::black_box;
use std::time::Instant;

use safeguard_engine::Sampling;
use safeguard_engine::sampling::Sampler;

const VOCAB: usize = 201_088;

/// The straightforward pick: argmax, then every softmax term in f64.
fn plain_pick(logits: &[f32]) -> (u32, f32) {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    let max = logits[best];
    let sum: f64 = logits.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v - max).exp()).sum();
    (best as u32, (1.0 / sum) as f32)
}

/// Best of five rounds of `rounds` calls, in milliseconds per call.
fn time_ms(rounds: usize, mut call: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..rounds {
                call();
            }
            started.elapsed().as_secs_f64() * 1e3 / rounds as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let logits: Vec<f32> = (0..VOCAB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 24.0 - 12.0
        })
        .collect();
    let mut sampler = Sampler::new(&Sampling::Greedy, 0).expect("greedy sampling needs no parameters");
    let pick = sampler.pick(&logits);
    let (token, prob) = plain_pick(&logits);
    assert_eq!(pick.token, token, "both pick the same token");
    println!("token {token}: probability {:.9e} (plain f64 {prob:.9e})", pick.prob);

    let plain = time_ms(200, || {
        black_box(plain_pick(black_box(&logits)));
    });
    let fast = time_ms(200, || {
        black_box(sampler.pick(black_box(&logits)));
    });
    println!("plain f64 pick  {plain:.3} ms");
    println!("Sampler::pick   {fast:.3} ms ({:.1}× faster)", plain / fast);
}
