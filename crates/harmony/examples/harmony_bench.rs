//! Rough timings of the harmony layer: tokenizer build, prompt render, completion parse.
//!
//! `cargo run -p safeguard-harmony --example harmony_bench [--release]`. Prints one line per measurement; the
//! numbers are for judging whether this layer matters next to model time (it should be microseconds against
//! milliseconds per token).

use std::hint::black_box;
use std::time::{Duration, Instant};

use safeguard_harmony::tokens::{CHANNEL, END, MESSAGE, RETURN, START};
use safeguard_harmony::{Content, Effort, PromptOptions, StreamParser, Tokenizer, parse_completion, render_prompt};

const POLICY_PARAGRAPH: &str = "## VIOLATES (1)\nRepetitive posting; cold promotion with links; phishing or malware \
    lures; fake giveaways; engagement bait that asks users to share credentials or payment details.\n";

fn time<T>(label: &str, iterations: u32, mut f: impl FnMut() -> T) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(f());
    }
    let per_call = start.elapsed() / iterations;
    println!("{label:<58} {:>10.1} µs/call ({iterations} calls)", per_call.as_secs_f64() * 1e6);
    per_call
}

fn main() {
    let start = Instant::now();
    let tokenizer = Tokenizer::shared();
    println!("{:<58} {:>10.1} ms", "tokenizer build (first Tokenizer::shared)", start.elapsed().as_secs_f64() * 1e3);

    let policy = format!("# Spam Policy\n## INSTRUCTIONS\nReturn 0 or 1.\n{}", POLICY_PARAGRAPH.repeat(12));
    let opts = PromptOptions { effort: Effort::Medium, date: Some("2025-11-01".into()) };
    let short = Content::text("Your account is locked. Enter your password here: http://x.co/login?next=%2F");
    let long_text = "Buy cheap meds now!!! 💊 http://spam.example/?id=12345 限时优惠 — ".repeat(150);
    let long = Content::Response { prompt: Some("Write me an ad".into()), response: long_text.clone() };
    let rendered = render_prompt(&policy, &short, &opts).expect("render");
    let rendered_long = render_prompt(&policy, &long, &opts).expect("render");
    println!(
        "prompt sizes: policy prefix {} tokens, short item {} tokens, long item {} tokens ({} chars)",
        rendered.prefix_len,
        rendered.tokens.len() - rendered.prefix_len,
        rendered_long.tokens.len() - rendered_long.prefix_len,
        long_text.chars().count()
    );
    time("render_prompt, short item", 2000, || render_prompt(&policy, &short, &opts));
    time("render_prompt, long item", 200, || render_prompt(&policy, &long, &opts));
    let prefix = safeguard_harmony::PromptPrefix::new(&policy, &opts).expect("prefix");
    time("PromptPrefix::render, short item (policy tokenized once)", 2000, || prefix.render(&short));

    let corpus = long_text.repeat(8);
    let per_call = time("encode_ordinary, 100 kB text", 20, || tokenizer.encode_ordinary(&corpus));
    println!("{:<58} {:>10.1} MB/s", "encode_ordinary throughput", corpus.len() as f64 / per_call.as_secs_f64() / 1e6);

    let reasoning =
        tokenizer.encode_ordinary(&"The post asks for a password via a link, which is phishing (SP3.b). ".repeat(60));
    let mut completion = vec![CHANNEL];
    completion.extend(tokenizer.encode_ordinary("analysis"));
    completion.push(MESSAGE);
    completion.extend(&reasoning);
    completion.extend([END, START]);
    completion.extend(tokenizer.encode_ordinary("assistant"));
    completion.push(CHANNEL);
    completion.extend(tokenizer.encode_ordinary("final"));
    completion.push(MESSAGE);
    completion.extend(tokenizer.encode_ordinary(r#"{"violation": 1, "policy_category": "SP3.b"}"#));
    completion.push(RETURN);
    let per_call =
        time(&format!("parse_completion, {} tokens", completion.len()), 200, || parse_completion(&completion));
    println!("{:<58} {:>10.0} ns/token", "stream parse cost", per_call.as_secs_f64() * 1e9 / completion.len() as f64);
    time("StreamParser push x all + finish", 200, || {
        let mut parser = StreamParser::new();
        for &t in &completion {
            black_box(parser.push(t));
        }
        parser.finish()
    });
}
