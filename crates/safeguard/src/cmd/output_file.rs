//! Output files that appear whole or not at all.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// An output file (`classify --output`, `export dataset --out`) written to a file beside it and renamed over it
/// only when the run completes: a run that fails (a model that does not load, a full disk, a database gone) must
/// not leave an earlier good result empty or cut short, nor a file that looks complete.
pub(crate) struct OutputFile {
    pub(crate) writer: BufWriter<File>,
    /// `(partial, dest)`; `None` when writing in place.
    rename: Option<(PathBuf, PathBuf)>,
}

impl OutputFile {
    pub(crate) fn create(path: &Path) -> anyhow::Result<Self> {
        let create_error = || format!("cannot create output file {}", path.display());
        let existing = match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() => {
                // A device or a pipe (`/dev/stdout`, `/dev/null`): a rename would replace the device itself.
                let file = File::create(path).with_context(create_error)?;
                return Ok(Self { writer: BufWriter::new(file), rename: None });
            }
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(create_error),
        };
        // Through a symlink, so that the link keeps pointing at the results instead of being replaced by them.
        let dest = match existing {
            Some(_) => std::fs::canonicalize(path).with_context(create_error)?,
            None => path.to_path_buf(),
        };
        let Some(name) = dest.file_name() else {
            anyhow::bail!("{} does not name a file", path.display());
        };
        let mut partial_name = name.to_os_string();
        // The process id keeps two runs writing the same output from sharing a partial file.
        partial_name.push(format!(".{}.partial", std::process::id()));
        let partial = dest.with_file_name(partial_name);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&partial).with_context(|| {
            format!("{}: cannot create {} to write the results to", create_error(), partial.display())
        })?;
        if let Some(meta) = existing
            && let Err(error) = file.set_permissions(meta.permissions())
        {
            tracing::warn!(%error, path = %dest.display(), "the results will not keep the output file's permissions");
        }
        Ok(Self { writer: BufWriter::new(file), rename: Some((partial, dest)) })
    }

    /// Writes `bytes` to `path` whole or not at all: a report or a policy file cut short by a crash or a full disk
    /// would otherwise read as complete.
    pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        let mut file = Self::create(path)?;
        let written = file.writer.write_all(bytes).with_context(|| format!("cannot write {}", path.display()));
        file.finish(written)
    }

    /// Moves the results into place if the run completed; otherwise leaves the output as it was and says where
    /// the records written before the failure are, so that work is not lost silently.
    pub(crate) fn finish<T>(self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let Some((partial, dest)) = self.rename else {
            let value = result?;
            self.writer.into_inner().map_err(|e| e.into_error()).context("cannot write the output")?;
            return Ok(value);
        };
        let writer = self.writer;
        let completed = result.and_then(|value| {
            let file = writer.into_inner().map_err(|e| e.into_error()).context("cannot write the output")?;
            file.sync_all().with_context(|| format!("cannot write {}", partial.display()))?;
            std::fs::rename(&partial, &dest)
                .with_context(|| format!("cannot move {} to {}", partial.display(), dest.display()))?;
            Ok(value)
        });
        let error = match completed {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let written = std::fs::metadata(&partial).map_or(0, |meta| meta.len());
        if written > 0 {
            return Err(error.context(format!(
                "{} was left as it was; the results written before the failure are in {}",
                dest.display(),
                partial.display()
            )));
        }
        if let Err(remove) = std::fs::remove_file(&partial)
            && remove.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %remove, path = %partial.display(), "cannot remove the empty partial output");
        }
        Err(error.context(format!("{} was left as it was", dest.display())))
    }
}
