//! Checkpoints (DESIGN.md): a directory with consolidated fp32 weights
//! (`model.safetensors`, names = module paths), the flat optimizer state as shards with
//! their offsets (`optimizer-NNNNN.safetensors`), and `meta.json` (counters, config snapshot,
//! parameter fingerprint, a SHA-256 per file).
//!
//! Writing is atomic: every file goes into a hidden staging directory, is fsynced, then the
//! directory is renamed into place and the `latest` pointer is replaced last. A crash at any
//! point leaves the previous checkpoints and pointer intact. Loading verifies every checksum
//! and, when asked, the fingerprint.

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const META_FILE: &str = "meta.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const LATEST_FILE: &str = "latest";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: checksum mismatch (the file is corrupted or was changed after saving)", path.display())]
    Checksum { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error(
        "{}: the checkpoint's parameters differ from the model's:\n{}",
        path.display(),
        differences.join("\n")
    )]
    Fingerprint {
        path: PathBuf,
        differences: Vec<String>,
    },
    #[error("{}: no valid checkpoint found{}", dir.display(), rejected_text(rejected))]
    NoneValid { dir: PathBuf, rejected: Vec<String> },
}

fn rejected_text(rejected: &[String]) -> String {
    if rejected.is_empty() {
        String::new()
    } else {
        format!(" (rejected: {})", rejected.join("; "))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// Name, shape and dtype of one parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// The parameters of a model, sorted by name: compared across ranks at start-up and stored in
/// every checkpoint, so a checkpoint of another architecture is refused with the differences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint(pub Vec<ParamInfo>);

fn shape_text(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Fingerprint {
    pub fn new(mut params: Vec<ParamInfo>) -> Self {
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Fingerprint(params)
    }

    /// One line per parameter that is missing on either side or differs in shape or dtype,
    /// `self` being the checkpoint and `model` the model it is loaded into.
    pub fn differences(&self, model: &Fingerprint) -> Vec<String> {
        let ours: BTreeMap<&str, &ParamInfo> =
            self.0.iter().map(|p| (p.name.as_str(), p)).collect();
        let theirs: BTreeMap<&str, &ParamInfo> =
            model.0.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut out = Vec::new();
        for (name, p) in &ours {
            match theirs.get(name) {
                None => out.push(format!(
                    "  {name}: {} in the checkpoint, absent from the model",
                    shape_text(&p.shape)
                )),
                Some(q) if q.shape != p.shape || q.dtype != p.dtype => out.push(format!(
                    "  {name}: {} {} in the checkpoint, {} {} in the model",
                    p.dtype,
                    shape_text(&p.shape),
                    q.dtype,
                    shape_text(&q.shape)
                )),
                Some(_) => {}
            }
        }
        for (name, q) in &theirs {
            if !ours.contains_key(name) {
                out.push(format!(
                    "  {name}: absent from the checkpoint, {} in the model",
                    shape_text(&q.shape)
                ));
            }
        }
        out
    }

    /// Scalars over all parameters.
    pub fn numel(&self) -> usize {
        self.0
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }
}

/// A host fp32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The optimizer state of the contiguous range `[offset, offset + len)` of the flat
/// parameter vector.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerShard {
    pub offset: usize,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// The EMA of the weights over the same range (`training.ema`), sharded like the moments.
    pub ema: Option<Vec<f32>>,
}

/// A written optimizer shard and its checksum, as one rank reports it to the committing rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub entry: ShardEntry,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub offset: usize,
    pub len: usize,
}

/// Everything but the tensors. `trainer` holds the trainer's own resumable state (data
/// position, RNG, best metric, ...), opaque to this module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub epoch: u64,
    /// AdamW updates applied (differs from `step` when steps were skipped).
    pub optimizer_updates: u64,
    pub world_size: usize,
    pub zero_stage: u8,
    pub config_yaml: String,
    pub fingerprint: Fingerprint,
    /// Length of the flat optimizer vector (without padding).
    pub flat_len: usize,
    pub optimizer_shards: Vec<ShardEntry>,
    pub trainer: serde_json::Value,
    /// SHA-256 (hex) of every other file of the checkpoint.
    pub files: BTreeMap<String, String>,
}

impl Meta {
    pub fn new(step: u64, epoch: u64, fingerprint: Fingerprint) -> Self {
        let flat_len = fingerprint.numel();
        Meta {
            format_version: FORMAT_VERSION,
            step,
            epoch,
            optimizer_updates: 0,
            world_size: 1,
            zero_stage: 0,
            config_yaml: String::new(),
            fingerprint,
            flat_len,
            optimizer_shards: Vec::new(),
            trainer: serde_json::Value::Null,
            files: BTreeMap::new(),
        }
    }
}

/// Name of the EMA tensor inside an optimizer shard file.
const EMA_TENSOR: &str = "ema";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Safetensors bytes of fp32 tensors, with optional header metadata.
pub(crate) fn serialize_f32(
    path: &Path,
    tensors: &[(String, &[usize], &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), f32_bytes(d), s.to_vec()))
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, data, shape) in &bytes {
        let view = TensorView::new(Dtype::F32, shape.clone(), data)
            .map_err(|e| format_err(path, format!("tensor {name}: {e}")))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, metadata).map_err(|e| format_err(path, e.to_string()))
}

/// A checkpoint being written: files go into a hidden directory beside the target and become
/// visible only in [`Staging::commit`].
#[derive(Debug)]
pub struct Staging {
    parent: PathBuf,
    name: String,
    tmp: PathBuf,
    files: BTreeMap<String, String>,
    shards: Vec<ShardEntry>,
}

impl Staging {
    /// Joins a staging directory that another rank created with [`Staging::new`] (after a
    /// barrier), to write this rank's optimizer shard into it.
    pub fn join(parent: &Path, name: &str) -> Result<Staging> {
        let tmp = parent.join(format!(".{name}.partial"));
        if !tmp.is_dir() {
            return Err(format_err(&tmp, "staging directory missing"));
        }
        Ok(Staging {
            parent: parent.to_path_buf(),
            name: name.to_string(),
            tmp,
            files: BTreeMap::new(),
            shards: Vec::new(),
        })
    }

    /// Starts `parent/name`, creating `parent` if needed. A staging directory left by a
    /// crashed writer of the same name is removed.
    pub fn new(parent: &Path, name: &str) -> Result<Staging> {
        fs::create_dir_all(parent).map_err(io(parent))?;
        let tmp = parent.join(format!(".{name}.partial"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(Staging {
            parent: parent.to_path_buf(),
            name: name.to_string(),
            tmp,
            files: BTreeMap::new(),
            shards: Vec::new(),
        })
    }

    fn add_file(&mut self, file: &str, bytes: &[u8]) -> Result<()> {
        write_synced(&self.tmp.join(file), bytes)?;
        self.files.insert(file.to_string(), sha256_hex(bytes));
        Ok(())
    }

    /// Consolidated weights, names = module paths.
    pub fn write_weights(&mut self, weights: &[(String, HostTensor)]) -> Result<()> {
        let path = self.tmp.join(WEIGHTS_FILE);
        let list: Vec<(String, &[usize], &[f32])> = weights
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.as_slice(), t.data.as_slice()))
            .collect();
        let bytes = serialize_f32(&path, &list, None)?;
        self.add_file(WEIGHTS_FILE, &bytes)
    }

    /// One shard of the flat optimizer state (one per rank under ZeRO), written as
    /// `optimizer-{index:05}.safetensors`. Returns its record; a rank other than the one that
    /// commits sends the record to it ([`Staging::record_shard`]).
    pub fn write_optimizer_shard(
        &mut self,
        index: usize,
        shard: &OptimizerShard,
    ) -> Result<ShardRecord> {
        let file = format!("optimizer-{index:05}.safetensors");
        let path = self.tmp.join(&file);
        let len = shard.exp_avg.len();
        if shard.exp_avg_sq.len() != len || shard.ema.as_ref().is_some_and(|e| e.len() != len) {
            return Err(format_err(&path, "moment or EMA buffers differ in length"));
        }
        let shape = [len];
        let mut tensors: Vec<(String, &[usize], &[f32])> = vec![
            ("exp_avg".into(), &shape, &shard.exp_avg),
            ("exp_avg_sq".into(), &shape, &shard.exp_avg_sq),
        ];
        if let Some(ema) = &shard.ema {
            tensors.push((EMA_TENSOR.into(), &shape, ema));
        }
        let bytes = serialize_f32(&path, &tensors, None)?;
        write_synced(&path, &bytes)?;
        let record = ShardRecord {
            entry: ShardEntry {
                file,
                offset: shard.offset,
                len,
            },
            sha256: sha256_hex(&bytes),
        };
        self.record_shard(record.clone());
        Ok(record)
    }

    /// Lists a shard written into this staging directory by another rank.
    pub fn record_shard(&mut self, record: ShardRecord) {
        self.files
            .insert(record.entry.file.clone(), record.sha256.clone());
        if !self.shards.contains(&record.entry) {
            self.shards.push(record.entry);
        }
    }

    /// Writes `meta.json`, moves the directory into place (replacing an older checkpoint of
    /// the same name) and points `latest` at it. Returns the checkpoint's path.
    pub fn commit(self, mut meta: Meta) -> Result<PathBuf> {
        meta.files = self.files.clone();
        let mut shards = self.shards.clone();
        shards.sort_by_key(|s| s.offset);
        meta.optimizer_shards = shards;
        let meta_path = self.tmp.join(META_FILE);
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| format_err(&meta_path, e.to_string()))?;
        write_synced(&meta_path, &json)?;
        sync_dir(&self.tmp)?;
        let target = self.parent.join(&self.name);
        if target.exists() {
            // A directory cannot be renamed over a non-empty one: move the old copy aside
            // first and delete it once the new one is in place.
            let old = self.parent.join(format!(".{}.old", self.name));
            if old.exists() {
                fs::remove_dir_all(&old).map_err(io(&old))?;
            }
            fs::rename(&target, &old).map_err(io(&target))?;
            fs::rename(&self.tmp, &target).map_err(io(&target))?;
            fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            fs::rename(&self.tmp, &target).map_err(io(&target))?;
        }
        let pointer_tmp = self.parent.join(format!(".{LATEST_FILE}.partial"));
        write_synced(&pointer_tmp, self.name.as_bytes())?;
        let pointer = self.parent.join(LATEST_FILE);
        fs::rename(&pointer_tmp, &pointer).map_err(io(&pointer))?;
        sync_dir(&self.parent)?;
        Ok(target)
    }
}

/// A verified checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub path: PathBuf,
    pub meta: Meta,
    /// In fingerprint (name) order.
    pub weights: Vec<(String, HostTensor)>,
    pub optimizer: Vec<OptimizerShard>,
}

impl Loaded {
    /// The optimizer moments of `[offset, offset + len)` of the flat vector, assembled from
    /// whatever shards were saved: this is what resuming on another world size reads.
    pub fn optimizer_range(&self, offset: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut m = vec![0.0; len];
        let mut v = vec![0.0; len];
        let mut covered = 0;
        for shard in &self.optimizer {
            let start = shard.offset.max(offset);
            let end = (shard.offset + shard.exp_avg.len()).min(offset + len);
            if start < end {
                let src = start - shard.offset..end - shard.offset;
                m[start - offset..end - offset].copy_from_slice(&shard.exp_avg[src.clone()]);
                v[start - offset..end - offset].copy_from_slice(&shard.exp_avg_sq[src]);
                covered += end - start;
            }
        }
        // Padding beyond the real parameters has no saved state and stays zero.
        let wanted = (offset + len)
            .min(self.meta.flat_len)
            .saturating_sub(offset);
        if covered < wanted {
            return Err(format_err(
                &self.path,
                format!(
                    "optimizer shards cover {covered} of the {wanted} values in [{offset}, {})",
                    offset + len
                ),
            ));
        }
        Ok((m, v))
    }

    /// Whether the checkpoint holds an EMA of the weights (`training.ema`).
    pub fn has_ema(&self) -> bool {
        !self.optimizer.is_empty() && self.optimizer.iter().all(|s| s.ema.is_some())
    }

    /// The EMA of `[offset, offset + len)` of the flat vector, from whatever shards were
    /// saved (any world size); `None` when the checkpoint has no EMA.
    pub fn ema_range(&self, offset: usize, len: usize) -> Result<Option<Vec<f32>>> {
        if !self.has_ema() {
            return Ok(None);
        }
        let mut out = vec![0.0; len];
        let mut covered = 0;
        for shard in &self.optimizer {
            let Some(ema) = &shard.ema else { continue };
            let start = shard.offset.max(offset);
            let end = (shard.offset + ema.len()).min(offset + len);
            if start < end {
                out[start - offset..end - offset]
                    .copy_from_slice(&ema[start - shard.offset..end - shard.offset]);
                covered += end - start;
            }
        }
        let wanted = (offset + len)
            .min(self.meta.flat_len)
            .saturating_sub(offset);
        if covered < wanted {
            return Err(format_err(
                &self.path,
                format!(
                    "EMA shards cover {covered} of the {wanted} values in [{offset}, {})",
                    offset + len
                ),
            ));
        }
        Ok(Some(out))
    }

    /// The EMA as named tensors in fingerprint order (what `sepdist export --ema` writes);
    /// `None` when the checkpoint has no EMA.
    pub fn ema_weights(&self) -> Result<Option<Vec<(String, HostTensor)>>> {
        let Some(flat) = self.ema_range(0, self.meta.flat_len)? else {
            return Ok(None);
        };
        let mut at = 0;
        let mut out = Vec::with_capacity(self.weights.len());
        for (name, t) in &self.weights {
            let n = t.data.len();
            out.push((
                name.clone(),
                HostTensor {
                    shape: t.shape.clone(),
                    data: flat[at..at + n].to_vec(),
                },
            ));
            at += n;
        }
        Ok(Some(out))
    }
}

fn read_verified(dir: &Path, file: &str, meta: &Meta) -> Result<Vec<u8>> {
    let path = dir.join(file);
    let bytes = fs::read(&path).map_err(io(&path))?;
    match meta.files.get(file) {
        Some(sum) if *sum == sha256_hex(&bytes) => Ok(bytes),
        Some(_) => Err(CheckpointError::Checksum { path }),
        None => Err(format_err(&path, "not listed in meta.json")),
    }
}

pub(crate) fn f32_tensor(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<HostTensor> {
    let view = st
        .tensor(name)
        .map_err(|e| format_err(path, format!("tensor {name}: {e}")))?;
    if view.dtype() != Dtype::F32 {
        return Err(format_err(
            path,
            format!("tensor {name} is {:?}, not F32", view.dtype()),
        ));
    }
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(HostTensor {
        shape: view.shape().to_vec(),
        data,
    })
}

/// Reads the metadata only (no checksums checked).
pub fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(io(&path))?;
    let meta: Meta =
        serde_json::from_slice(&bytes).map_err(|e| format_err(&path, e.to_string()))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(format_err(
            &path,
            format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                meta.format_version
            ),
        ));
    }
    Ok(meta)
}

/// Loads and verifies a checkpoint. With `expected`, a different parameter set is refused
/// with the list of differing parameters.
pub fn load(dir: &Path, expected: Option<&Fingerprint>) -> Result<Loaded> {
    let meta = read_meta(dir)?;
    if let Some(model) = expected {
        let differences = meta.fingerprint.differences(model);
        if !differences.is_empty() {
            return Err(CheckpointError::Fingerprint {
                path: dir.to_path_buf(),
                differences,
            });
        }
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = read_verified(dir, WEIGHTS_FILE, &meta)?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| format_err(&weights_path, e.to_string()))?;
    let mut weights = Vec::with_capacity(meta.fingerprint.0.len());
    for p in &meta.fingerprint.0 {
        let t = f32_tensor(&weights_path, &st, &p.name)?;
        if t.shape != p.shape {
            return Err(format_err(
                &weights_path,
                format!(
                    "{} has shape {:?}, meta.json says {:?}",
                    p.name, t.shape, p.shape
                ),
            ));
        }
        weights.push((p.name.clone(), t));
    }
    let mut optimizer = Vec::with_capacity(meta.optimizer_shards.len());
    for entry in &meta.optimizer_shards {
        let path = dir.join(&entry.file);
        let bytes = read_verified(dir, &entry.file, &meta)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(&path, e.to_string()))?;
        let m = f32_tensor(&path, &st, "exp_avg")?;
        let v = f32_tensor(&path, &st, "exp_avg_sq")?;
        let ema = if st.names().contains(&EMA_TENSOR) {
            Some(f32_tensor(&path, &st, EMA_TENSOR)?.data)
        } else {
            None
        };
        if m.data.len() != entry.len
            || v.data.len() != entry.len
            || ema.as_ref().is_some_and(|e| e.len() != entry.len)
        {
            return Err(format_err(&path, "shard length differs from meta.json"));
        }
        optimizer.push(OptimizerShard {
            offset: entry.offset,
            exp_avg: m.data,
            exp_avg_sq: v.data,
            ema,
        });
    }
    Ok(Loaded {
        path: dir.to_path_buf(),
        meta,
        weights,
        optimizer,
    })
}

/// Checkpoint directories of `parent`, newest (highest step, then latest written) first.
/// Directories whose `meta.json` cannot be read are left out ([`resolve_reporting`] reports
/// them); hidden ones (staging, `.NAME.old`) are never checkpoints.
pub fn list(parent: &Path) -> Result<Vec<(PathBuf, Meta)>> {
    Ok(scan(parent)?.0)
}

/// The checkpoints of a directory as [`list`] orders them, and the errors of the visible
/// directories whose `meta.json` is missing or unreadable.
type Scan = (Vec<(PathBuf, Meta)>, Vec<CheckpointError>);

fn scan(parent: &Path) -> Result<Scan> {
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    let entries = match fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(io(parent)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io(parent))?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if path.is_dir() && !hidden {
            match read_meta(&path) {
                Ok(meta) => {
                    let written = fs::metadata(path.join(META_FILE))
                        .and_then(|m| m.modified())
                        .ok();
                    found.push((path, meta, written));
                }
                Err(e) => unreadable.push((path, e)),
            }
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse((f.1.step, f.2)));
    unreadable.sort_by(|a, b| b.0.cmp(&a.0));
    Ok((
        found.into_iter().map(|(p, m, _)| (p, m)).collect(),
        unreadable.into_iter().map(|(_, e)| e).collect(),
    ))
}

/// What `--resume` names: `auto` is the newest checkpoint of `parent` that loads and
/// verifies (falling back past corrupted ones), `latest` the one the pointer names, anything
/// else a checkpoint directory.
pub fn resolve(parent: &Path, spec: &str, expected: Option<&Fingerprint>) -> Result<Loaded> {
    resolve_reporting(parent, spec, expected).map(|(loaded, _)| loaded)
}

/// [`resolve`], with the reasons `auto` passed over checkpoints: the newer ones that failed to
/// load or verify, and any directory whose `meta.json` is missing or unreadable (one line
/// each, naming the file). Empty for `latest` and a path, which refuse a bad checkpoint
/// instead. With no checkpoint at all, `auto` fails with [`CheckpointError::NoneValid`] and
/// an empty `rejected`: nothing to resume, start fresh.
pub fn resolve_reporting(
    parent: &Path,
    spec: &str,
    expected: Option<&Fingerprint>,
) -> Result<(Loaded, Vec<String>)> {
    match spec {
        "auto" => {
            let (candidates, unreadable) = scan(parent)?;
            let mut rejected: Vec<String> = unreadable.iter().map(ToString::to_string).collect();
            for (path, _) in candidates {
                match load(&path, expected) {
                    Ok(loaded) => return Ok((loaded, rejected)),
                    Err(e) => rejected.push(e.to_string()),
                }
            }
            Err(CheckpointError::NoneValid {
                dir: parent.to_path_buf(),
                rejected,
            })
        }
        "latest" => {
            let pointer = parent.join(LATEST_FILE);
            let name = fs::read_to_string(&pointer).map_err(io(&pointer))?;
            Ok((load(&parent.join(name.trim()), expected)?, Vec::new()))
        }
        path => Ok((load(Path::new(path), expected)?, Vec::new())),
    }
}

/// Removes the oldest checkpoints whose names start with `prefix` beyond the newest `keep`.
pub fn prune(parent: &Path, prefix: &str, keep: usize) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let matching: Vec<PathBuf> = list(parent)?
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    for path in matching.into_iter().skip(keep) {
        fs::remove_dir_all(&path).map_err(io(&path))?;
        removed.push(path);
    }
    Ok(removed)
}
