//! `cargo run --release -p safeguard-triage --example bench_triage [DATA_DIR]`: the triage benchmark
//! without building the whole CLI (llama.cpp); prints the report as JSON.

fn main() {
    let mut options = safeguard_triage::bench::BenchOptions::default();
    if let Some(dir) = std::env::args().nth(1) {
        options.data_dir = dir.into();
    }
    match safeguard_triage::bench::run(&options) {
        Ok(report) => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("error: {e}"),
        },
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
