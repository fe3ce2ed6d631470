#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions
//! Checkpoint directories: round trip, atomicity, verification and resharding.

use sepdist_train::checkpoint::{
    self, CheckpointError, Fingerprint, HostTensor, Meta, OptimizerShard, ParamInfo, Staging,
};
use std::path::Path;

fn info(name: &str, shape: &[usize]) -> ParamInfo {
    ParamInfo {
        name: name.into(),
        shape: shape.to_vec(),
        dtype: "f32".into(),
    }
}

fn model() -> (Fingerprint, Vec<(String, HostTensor)>) {
    let fp = Fingerprint::new(vec![info("b.weight", &[2, 3]), info("a.bias", &[3])]);
    let weights =
        fp.0.iter()
            .map(|p| {
                let n: usize = p.shape.iter().product();
                let data = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
                (
                    p.name.clone(),
                    HostTensor {
                        shape: p.shape.clone(),
                        data,
                    },
                )
            })
            .collect();
    (fp, weights)
}

/// Saves step `step` with the flat moments split into `shards` pieces.
fn save(parent: &Path, name: &str, step: u64, shards: usize) -> std::path::PathBuf {
    let (fp, weights) = model();
    let n = fp.numel();
    let m: Vec<f32> = (0..n).map(|i| i as f32 + step as f32).collect();
    let v: Vec<f32> = (0..n).map(|i| (i * i) as f32).collect();
    let mut staging = Staging::new(parent, name).unwrap();
    staging.write_weights(&weights).unwrap();
    let per = n.div_ceil(shards);
    for k in 0..shards {
        let range = (k * per).min(n)..((k + 1) * per).min(n);
        staging
            .write_optimizer_shard(
                k,
                &OptimizerShard {
                    offset: range.start,
                    exp_avg: m[range.clone()].to_vec(),
                    exp_avg_sq: v[range].to_vec(),
                    ema: None,
                },
            )
            .unwrap();
    }
    let mut meta = Meta::new(step, 0, fp);
    meta.world_size = shards;
    meta.trainer = serde_json::json!({"samples_seen": step * 8});
    staging.commit(meta).unwrap()
}

#[test]
fn round_trip_keeps_weights_moments_and_meta() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "step_00000003", 3, 1);
    let (fp, weights) = model();
    let loaded = checkpoint::load(&path, Some(&fp)).unwrap();
    assert_eq!(loaded.weights, weights);
    assert_eq!(loaded.meta.step, 3);
    assert_eq!(loaded.meta.trainer["samples_seen"], 24);
    let (m, v) = loaded.optimizer_range(0, fp.numel()).unwrap();
    assert_eq!(m[4], 7.0);
    assert_eq!(v[4], 16.0);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("latest")).unwrap(),
        "step_00000003"
    );
    // No staging leftovers.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn optimizer_state_of_any_split_reassembles() {
    // Saved by 4 ranks, read back as 2 ranks' ranges (and the reverse).
    let dir = tempfile::tempdir().unwrap();
    let four = checkpoint::load(&save(dir.path(), "four", 1, 4), None).unwrap();
    let one = checkpoint::load(&save(dir.path(), "one", 1, 1), None).unwrap();
    assert_eq!(four.optimizer.len(), 4);
    let n = four.meta.flat_len;
    for (offset, len) in [(0, 5), (5, n - 5), (0, n)] {
        assert_eq!(
            four.optimizer_range(offset, len).unwrap(),
            one.optimizer_range(offset, len).unwrap()
        );
    }
    // Padding past the parameters reads as zeros.
    let (m, _) = one.optimizer_range(n - 1, 3).unwrap();
    assert_eq!(m[1..], [0.0, 0.0]);
}

#[test]
fn a_flipped_byte_is_refused_naming_the_file_and_auto_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "step_00000001", 1, 1);
    let newest = save(dir.path(), "step_00000002", 2, 2);
    let victim = newest.join("optimizer-00001.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();

    let e = checkpoint::load(&newest, None).unwrap_err();
    assert!(matches!(e, CheckpointError::Checksum { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: checksum mismatch (the file is corrupted or was changed after saving)",
            victim.display()
        )
    );
    // `latest` names the corrupted one; `auto` takes the previous valid checkpoint.
    assert!(checkpoint::resolve(dir.path(), "latest", None).is_err());
    let auto = checkpoint::resolve(dir.path(), "auto", None).unwrap();
    assert_eq!(auto.meta.step, 1);
    assert!(auto.path.ends_with("step_00000001"));
}

#[test]
fn no_valid_checkpoint_says_why_each_was_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let only = save(dir.path(), "step_00000001", 1, 1);
    std::fs::write(only.join("model.safetensors"), b"garbage").unwrap();
    let e = checkpoint::resolve(dir.path(), "auto", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no valid checkpoint found"), "{e}");
    assert!(e.contains("model.safetensors: checksum mismatch"), "{e}");
}

#[test]
fn fingerprint_mismatch_lists_the_differing_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "step_00000001", 1, 1);
    let other = Fingerprint::new(vec![info("a.bias", &[4]), info("c.gamma", &[3])]);
    let e = checkpoint::load(&path, Some(&other))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "{}: the checkpoint's parameters differ from the model's:\n  \
             a.bias: f32 [3] in the checkpoint, f32 [4] in the model\n  \
             b.weight: [2, 3] in the checkpoint, absent from the model\n  \
             c.gamma: absent from the checkpoint, [3] in the model",
            path.display()
        )
    );
}

#[test]
fn rewriting_a_name_replaces_it_and_a_crashed_staging_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), "best_model", 1, 1);
    save(dir.path(), "best_model", 5, 1);
    assert_eq!(
        checkpoint::resolve(dir.path(), "latest", None)
            .unwrap()
            .meta
            .step,
        5
    );
    // A writer that died before commit leaves a hidden staging directory only.
    let mut staging = Staging::new(dir.path(), "step_00000009").unwrap();
    staging.write_weights(&model().1).unwrap();
    drop(staging);
    let listed: Vec<u64> = checkpoint::list(dir.path())
        .unwrap()
        .iter()
        .map(|(_, m)| m.step)
        .collect();
    assert_eq!(listed, vec![5]);
    assert_eq!(
        checkpoint::resolve(dir.path(), "auto", None)
            .unwrap()
            .meta
            .step,
        5
    );
}

#[test]
fn prune_keeps_the_newest_of_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    for s in 1..=4 {
        save(dir.path(), &format!("step_{s:08}"), s, 1);
    }
    save(dir.path(), "checkpoint_epoch1", 2, 1);
    let removed = checkpoint::prune(dir.path(), "step_", 2).unwrap();
    assert_eq!(removed.len(), 2);
    let mut left: Vec<String> = checkpoint::list(dir.path())
        .unwrap()
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["checkpoint_epoch1", "step_00000003", "step_00000004"]
    );
}
