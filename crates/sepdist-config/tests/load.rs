use sepdist_config::{Bands, Config, ConfigError, ConfigSource, load_file, load_str};
use std::path::Path;

fn load(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load_str(
        ConfigSource {
            name: Path::new("test.yaml"),
            text,
        },
        &overrides,
    )
}

fn err(text: &str, overrides: &[&str]) -> String {
    match load(text, overrides) {
        Ok(_) => panic!("expected an error for {text:?} {overrides:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_file_is_the_default_config() {
    assert_eq!(load("", &[]).unwrap(), Config::default());
    assert_eq!(load("training: {}\n", &[]).unwrap(), Config::default());
}

#[test]
fn partial_sections_keep_defaults() {
    let c = load("training:\n  batch_size: 3\n", &[]).unwrap();
    assert_eq!(c.training.batch_size, 3);
    assert_eq!(c.training.gradient_accumulation_steps, 2);
    assert_eq!(c.model, Config::default().model);
}

#[test]
fn unknown_key_names_file_line_and_nearest_key() {
    let e = err("model:\n  n_fft: 2048\ntraining:\n  batchsize: 2\n", &[]);
    assert_eq!(
        e,
        "test.yaml:4:3: unknown key `training.batchsize`; did you mean `training.batch_size`?"
    );
    let e = err("trainig:\n  batch_size: 2\n", &[]);
    assert_eq!(
        e,
        "test.yaml:1:1: unknown key `trainig`; did you mean `training`?"
    );
    let e = err("dataset:\n  augment:\n    gian: [0.5, 1.0]\n", &[]);
    assert!(
        e.contains("unknown key `dataset.augment.gian`; did you mean `dataset.augment.gain`?"),
        "{e}"
    );
}

#[test]
fn unknown_key_far_from_any_gets_no_suggestion() {
    let e = err("training:\n  completely_unrelated_thing: 1\n", &[]);
    assert_eq!(
        e,
        "test.yaml:2:3: unknown key `training.completely_unrelated_thing`"
    );
}

#[test]
fn wrong_type_names_file_line_key_and_expected_type() {
    let e = err("training:\n  batch_size: two\n", &[]);
    assert!(e.starts_with("test.yaml:2:15: "), "{e}");
    assert!(e.contains("training.batch_size"), "{e}");
    assert!(e.contains("expected usize"), "{e}");
    let e = err("model:\n  ffn_hidden_dim: [1, 2, 3]\n", &[]);
    assert!(e.starts_with("test.yaml:2:"), "{e}");
    assert!(e.contains("model.ffn_hidden_dim"), "{e}");
    let e = err("training:\n  precision: fp16\n", &[]);
    assert!(
        e.contains("unknown variant `fp16`, expected `fp32` or `bf16`"),
        "{e}"
    );
    let e = err("model:\n  bands: bs_roformer_99\n", &[]);
    assert!(e.contains("band preset (`bs_roformer_62`)"), "{e}");
    let e = err("training:\n  device: gpu\n", &[]);
    assert!(e.starts_with("test.yaml:2:"), "{e}");
    assert!(e.contains("training.device"), "{e}");
    assert!(
        e.contains("unknown variant `gpu`, expected one of `auto`, `cpu`, `cuda`"),
        "{e}"
    );
    let e = err("", &["training.device=tpu"]);
    assert!(e.contains("--set training.device=tpu"), "{e}");
    assert!(e.contains("unknown variant `tpu`"), "{e}");
    let e = err("training:\n  cuda_pool_release_threshold: lots\n", &[]);
    assert!(e.contains("training.cuda_pool_release_threshold"), "{e}");
    assert!(e.contains("or `max`"), "{e}");
}

#[test]
fn precision_and_tf32_load_from_the_file_and_set() {
    let c = load("", &[]).unwrap();
    assert_eq!(c.training.precision, sepdist_config::Precision::Fp32);
    assert!(c.training.tf32, "TF32 is on by default");
    let c = load("training:\n  precision: bf16\n  tf32: false\n", &[]).unwrap();
    assert_eq!(c.training.precision, sepdist_config::Precision::Bf16);
    assert!(!c.training.tf32);
    let c = load("", &["training.tf32=false"]).unwrap();
    assert!(!c.training.tf32);
    let e = err("training:\n  tf32: sometimes\n", &[]);
    assert!(e.starts_with("test.yaml:2:"), "{e}");
    assert!(e.contains("training.tf32"), "{e}");
}

#[test]
fn invalid_yaml_names_the_line() {
    let e = err("training:\n  batch_size: [1, 2\n", &[]);
    assert!(e.starts_with("test.yaml:"), "{e}");
    assert!(e.contains("invalid YAML"), "{e}");
}

fn violation(text: &str, overrides: &[&str], expected: &str) {
    let e = err(text, overrides);
    assert!(e.contains("invalid configuration"), "{e}");
    assert!(e.contains(expected), "expected {expected:?} in:\n{e}");
}

#[test]
fn cross_field_rules() {
    violation(
        "distributed:\n  backend: nccl\ntraining:\n  device: cpu\n",
        &[],
        "training.device: cpu, but distributed.backend: nccl runs on GPUs",
    );
    violation(
        "model:\n  bands: [512, 512]\n",
        &[],
        "model.bands: the 2 bands cover 1024 bins, but n_fft = 2048 has n_fft/2+1 = 1025 bins",
    );
    violation(
        "model:\n  n_fft: 1024\n",
        &[],
        "model.bands: the 62 bands cover 1025 bins, but n_fft = 1024 has n_fft/2+1 = 513 bins",
    );
    violation(
        "model:\n  emb_dim: 100\n  n_heads: 16\n",
        &[],
        "model.emb_dim: 100 is not divisible by model.n_heads = 16",
    );
    violation(
        "dataset:\n  segment_length: 1000\n",
        &[],
        "dataset.segment_length: 1000 is shorter than model.n_fft = 2048",
    );
    violation(
        "dataset:\n  sources: []\n",
        &[],
        "dataset.sources: must name at least one source",
    );
    violation(
        "dataset:\n  sources: [drums, bass, drums]\n",
        &[],
        "dataset.sources: `drums` is listed twice",
    );
    violation(
        "model:\n  hop_length: 4096\n",
        &[],
        "model.hop_length: 4096 must be between 1 and model.n_fft = 2048",
    );
    violation(
        "model:\n  emb_dim: 48\n  n_heads: 16\n",
        &[],
        "model.n_heads: head dimension emb_dim/n_heads = 3 must be even",
    );
    violation(
        "training:\n  batch_size: 0\n",
        &[],
        "training.batch_size: must be at least 1",
    );
    violation(
        "training:\n  gradient_accumulation_steps: 0\n",
        &[],
        "training.gradient_accumulation_steps: must be at least 1",
    );
    violation(
        "training:\n  optimizer: {betas: [0.9, 1.0]}\n",
        &[],
        "training.optimizer.betas",
    );
    violation(
        "training:\n  optimizer: {lr: 0}\n",
        &[],
        "training.optimizer.lr: 0 must be positive",
    );
    violation(
        "training:\n  grad_clip: -1\n",
        &[],
        "training.grad_clip: -1 must be positive",
    );
    violation(
        "dataset:\n  augment: {gain: [1.5, 0.5]}\n",
        &[],
        "dataset.augment.gain: [1.5, 0.5] must satisfy 0 <= min <= max",
    );
    violation(
        "distributed:\n  zero_stage: 4\n",
        &[],
        "distributed.zero_stage: 4 must be 0, 1, 2 or 3",
    );
    violation(
        "dataset:\n  format: synthetic\n  segment_length: 441000\n  synthetic: {seconds: 5}\n",
        &[],
        "dataset.synthetic.seconds: 5 s at 44100 Hz is shorter than dataset.segment_length = 441000",
    );
    violation(
        "dataset:\n  segment_length: 2048\n",
        &[],
        "window 4096 uses n_fft 4096, whose reflect padding needs dataset.segment_length > 2048",
    );
}

#[test]
fn every_violation_is_listed() {
    let e = err("training:\n  batch_size: 0\n  epochs: 0\n", &[]);
    assert!(e.contains("training.batch_size"), "{e}");
    assert!(e.contains("training.epochs"), "{e}");
}

#[test]
fn overrides_of_scalars_lists_and_nested_keys() {
    let c = load(
        "training:\n  batch_size: 8\n",
        &[
            "training.batch_size=2",
            "model.ffn_hidden_dim=[768,768]",
            "training.optimizer.lr=1e-3",
            "training.gradient_checkpointing=true",
            "dataset.augment.gain=[0.5, 1.0]",
            "model.bands=[1, 1024]",
            "training.output_dir=123",
            "training.grad_clip=null",
            "dataset.format=synthetic",
            "dataset.synthetic.seconds=30",
        ],
    )
    .unwrap();
    assert_eq!(c.training.batch_size, 2);
    assert_eq!(c.model.ffn_hidden_dim, [768, 768]);
    assert_eq!(c.training.optimizer.lr, 1e-3);
    assert!(c.training.gradient_checkpointing);
    assert_eq!(c.dataset.augment.gain, [0.5, 1.0]);
    assert_eq!(c.model.bands, Bands::Widths(vec![1, 1024]));
    assert_eq!(c.training.output_dir, Path::new("123"));
    assert_eq!(c.training.grad_clip, None);
    // Later overrides win.
    let c = load("", &["training.batch_size=2", "training.batch_size=5"]).unwrap();
    assert_eq!(c.training.batch_size, 5);
}

#[test]
fn bad_overrides_are_named() {
    assert_eq!(
        err("", &["training.batch_size"]),
        "malformed override `training.batch_size`: expected KEY=VALUE, e.g. training.batch_size=2"
    );
    assert_eq!(
        err("", &["training.batchsize=2"]),
        "--set training.batchsize=2: unknown key `training.batchsize`; did you mean `training.batch_size`?"
    );
    assert_eq!(
        err("", &["training.batch_size.x=2"]),
        "--set training.batch_size.x=2: unknown key `training.batch_size.x`"
    );
    let e = err("", &["training.batch_size=two"]);
    assert!(e.starts_with("--set training.batch_size=two: "), "{e}");
    assert!(e.contains("expected usize"), "{e}");
    let e = err("", &["model.ffn_hidden_dim=[1,2"]);
    assert!(
        e.starts_with(
            "malformed override `model.ffn_hidden_dim=[1,2`: the value is not valid YAML"
        ),
        "{e}"
    );
    // Validation still applies after overrides.
    let e = err("", &["model.emb_dim=100"]);
    assert!(e.contains("model.emb_dim: 100 is not divisible"), "{e}");
}

#[test]
fn missing_file_is_named() {
    let e = load_file(Path::new("/nonexistent/x.yaml"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot read config file /nonexistent/x.yaml:"),
        "{e}"
    );
}

#[test]
fn resolved_yaml_round_trips() {
    let c = load("model:\n  bands: [1, 1024]\n", &["training.grad_clip=null"]).unwrap();
    let again = load(&c.to_yaml(), &[]).unwrap();
    assert_eq!(c, again);
}

#[test]
fn bs_roformer_62_has_62_bands_covering_1025_bins() {
    let w = Bands::BsRoformer62.widths();
    assert_eq!(w.len(), 62);
    assert_eq!(w.iter().sum::<usize>(), 1025);
}
