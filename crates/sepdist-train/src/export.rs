//! `sepdist export`: one self-contained weights file from a checkpoint. A safetensors file
//! with the fp32 weights (names = module paths, as in a checkpoint's `model.safetensors`) or
//! their EMA, and in its metadata the resolved training config (YAML), so that `separate` and
//! `eval` rebuild the model from the file alone.
//!
//! Metadata keys: `sepdist.format` = [`FORMAT`], `sepdist.config` (YAML), `sepdist.step`,
//! `sepdist.weights` (`model` or `ema`).

use crate::checkpoint::{self, HostTensor};
use crate::infer::{InferError, Result, checkpoint_dir};
use safetensors::SafeTensors;
use sepdist_config::{Config, ConfigSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Value of the `sepdist.format` metadata key.
pub const FORMAT: &str = "sepdist-weights-1";
const KEY_FORMAT: &str = "sepdist.format";
const KEY_CONFIG: &str = "sepdist.config";
const KEY_STEP: &str = "sepdist.step";
const KEY_WEIGHTS: &str = "sepdist.weights";

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub checkpoint: PathBuf,
    pub step: u64,
    pub tensors: usize,
    pub parameters: usize,
    pub ema: bool,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> InferError {
    InferError::Argument(format!("{}: {what}", path.display()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InferError + '_ {
    move |source| InferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the weights (or, with `ema`, their moving average) of the checkpoint `path` names
/// (see [`checkpoint_dir`]) to `out`, atomically (a temporary sibling renamed into place).
pub fn export(path: &Path, out: &Path, ema: bool) -> Result<Exported> {
    let dir = checkpoint_dir(path)?;
    let loaded = checkpoint::load(&dir, None)?;
    let weights = if ema {
        loaded.ema_weights()?.ok_or_else(|| {
            invalid(
                &dir,
                "has no EMA of the weights (train with training.ema set, or export without --ema)",
            )
        })?
    } else {
        loaded.weights
    };
    let metadata: HashMap<String, String> = [
        (KEY_FORMAT, FORMAT.to_string()),
        (KEY_CONFIG, loaded.meta.config_yaml.clone()),
        (KEY_STEP, loaded.meta.step.to_string()),
        (KEY_WEIGHTS, if ema { "ema" } else { "model" }.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let tensors: Vec<(String, &[usize], &[f32])> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.as_slice(), t.data.as_slice()))
        .collect();
    let file = checkpoint::serialize_f32(out, &tensors, Some(metadata))?;
    let name = out
        .file_name()
        .ok_or_else(|| invalid(out, "is not a file path"))?;
    let tmp = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    std::fs::write(&tmp, &file).map_err(io(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(Exported {
        checkpoint: dir,
        step: loaded.meta.step,
        tensors: weights.len(),
        parameters: weights.iter().map(|(_, t)| t.data.len()).sum(),
        ema,
    })
}

/// An exported file read back: the config, the step and the named tensors.
pub struct ExportedFile {
    pub config: Config,
    pub step: u64,
    pub weights: Vec<(String, HostTensor)>,
}

/// Reads a file written by [`export`]. A safetensors file without sepdist's metadata, or
/// anything else, is refused naming the file.
pub fn read(path: &Path) -> Result<ExportedFile> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| invalid(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get(KEY_FORMAT).map(String::as_str) != Some(FORMAT) {
        return Err(invalid(
            path,
            "not a sepdist export (no sepdist.format metadata); give a checkpoint directory or a file written by `sepdist export`",
        ));
    }
    let yaml = meta
        .get(KEY_CONFIG)
        .ok_or_else(|| invalid(path, "no sepdist.config metadata"))?;
    let config = sepdist_config::load_str(
        ConfigSource {
            name: path,
            text: yaml,
        },
        &[],
    )
    .map_err(|e| InferError::Config {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    let step = meta
        .get(KEY_STEP)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(path, "sepdist.step metadata is missing or not a number"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(path, e.to_string()))?;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weights = Vec::with_capacity(names.len());
    for name in names {
        let tensor = checkpoint::f32_tensor(path, &st, &name)?;
        weights.push((name, tensor));
    }
    Ok(ExportedFile {
        config,
        step,
        weights,
    })
}
