//! Reliability across real OS processes.
//!
//! The writers here are separate processes: this test binary re-executes
//! itself with `LORA_ARTIFACT_WORKER` set, and the `worker` test turns into a
//! store loop that acknowledges each committed version on stdout
//! (`STORED <trial> <version>`). The parent runs several at once, kills them
//! with SIGKILL at random moments or has them SIGKILL themselves at a chosen
//! store phase, and then checks the store: no version lost or duplicated,
//! nothing half-registered, corruption found, gc never breaking a version.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lora_artifact::{ArtifactStore, GcOptions, StorePhase, hash_adapter_dir};
use lora_skill::SkillContext;
use lora_spec::contracts::artifact::ArtifactStoreInput;

const ENV: &str = "LORA_ARTIFACT_WORKER";

/// What a worker process does, passed through the environment.
#[derive(Debug, Clone)]
struct Job {
    root: PathBuf,
    scratch: PathBuf,
    worker: u32,
    /// Stores to make; 0 = until killed.
    count: u32,
    /// Bytes of the unique weights file.
    size: usize,
    /// Kill itself with SIGKILL when the first store reaches this phase.
    die_at: Option<String>,
}

impl Job {
    fn to_env(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}",
            self.root.display(),
            self.scratch.display(),
            self.worker,
            self.count,
            self.size,
            self.die_at.clone().unwrap_or_default()
        )
    }

    fn from_env(s: &str) -> Self {
        let p: Vec<&str> = s.split('|').collect();
        Self {
            root: PathBuf::from(p[0]),
            scratch: PathBuf::from(p[1]),
            worker: p[2].parse().expect("worker"),
            count: p[3].parse().expect("count"),
            size: p[4].parse().expect("size"),
            die_at: Some(p[5].to_string()).filter(|s| !s.is_empty()),
        }
    }
}

/// Deterministic bytes for (seed, n).
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An adapter folder for item `i` of `worker`. Every fifth item is the same
/// adapter in every worker, so that workers race to publish one folder.
fn make_adapter(dir: &Path, worker: u32, i: u32, size: usize) {
    let seed = if i.is_multiple_of(5) {
        u64::from(i)
    } else {
        (u64::from(worker) << 32) | u64::from(i)
    };
    fs::create_dir_all(dir.join("extra")).expect("mkdir");
    fs::write(
        dir.join("adapter_config.json"),
        br#"{"r": 8, "lora_alpha": 16}"#,
    )
    .expect("write");
    fs::write(dir.join("adapter_model.safetensors"), bytes(seed + 1, size)).expect("write");
    fs::write(dir.join("extra/notes.txt"), bytes(seed + 2, 100)).expect("write");
}

fn trial_of(worker: u32, i: u32) -> u32 {
    worker * 10_000 + i
}

fn input_for(dir: &Path, worker: u32, i: u32) -> ArtifactStoreInput {
    let mut inp = ArtifactStoreInput::new(dir.display().to_string(), trial_of(worker, i));
    inp.metrics
        .insert("eval_loss".into(), 1.0 / f64::from(i + 1));
    inp.tags = vec![format!("worker-{worker}")];
    inp
}

fn phase_name(p: StorePhase) -> &'static str {
    match p {
        StorePhase::Hashed => "hashed",
        StorePhase::BlobsWritten => "blobs_written",
        StorePhase::AdapterPublished => "adapter_published",
        StorePhase::Committed => "committed",
    }
}

/// The worker's store loop; returns the versions it stored.
fn run_job(job: &Job, out: &mut dyn Write) -> Vec<(u32, String)> {
    let ctx = SkillContext::new(&job.scratch);
    let mut store = ArtifactStore::open(&job.root).expect("open store");
    let mut done = Vec::new();
    let mut i = 0u32;
    while job.count == 0 || i < job.count {
        let dir = job.scratch.join(format!("src-{}-{i}", job.worker));
        make_adapter(&dir, job.worker, i, job.size);
        let die_at = job.die_at.clone();
        let o = store
            .store_observed(&input_for(&dir, job.worker, i), &ctx, &mut |phase| {
                if die_at.as_deref() == Some(phase_name(phase)) {
                    // kill -9 of ourselves, at exactly this point.
                    let pid = std::process::id().to_string();
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            })
            .expect("store");
        writeln!(out, "\nSTORED {} {}", o.trial_id, o.version).expect("ack");
        out.flush().expect("flush");
        let _ = fs::remove_dir_all(&dir);
        done.push((o.trial_id, o.version));
        i += 1;
    }
    done
}

/// Worker entry point when re-executed; otherwise the same loop in-process.
#[test]
fn worker() {
    if let Ok(spec) = std::env::var(ENV) {
        let job = Job::from_env(&spec);
        run_job(&job, &mut std::io::stdout());
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = Job {
        root: tmp.path().join("store"),
        scratch: tmp.path().to_path_buf(),
        worker: 1,
        count: 6,
        size: 4096,
        die_at: None,
    };
    let mut sink = Vec::new();
    let done = run_job(&job, &mut sink);
    let versions: Vec<_> = done.iter().map(|d| d.1.as_str()).collect();
    assert_eq!(versions, ["v1", "v2", "v3", "v4", "v5", "v6"]);
    assert_eq!(
        parse_acks(&String::from_utf8_lossy(&sink)),
        done.into_iter().collect()
    );
}

fn spawn(job: &Job) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .args([
            "worker",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
            "-q",
        ])
        .env(ENV, job.to_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

fn parse_acks(text: &str) -> BTreeMap<u32, String> {
    let mut acks = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if w.next() == Some("STORED") {
            let trial: u32 = w.next().and_then(|t| t.parse().ok()).expect("trial");
            let version = w.next().expect("version").to_string();
            assert!(
                acks.insert(trial, version).is_none(),
                "trial acknowledged twice"
            );
        }
    }
    acks
}

/// Checks the invariants of a store no one is writing to; returns trial -> version.
fn check_store(root: &Path, why: &str) -> BTreeMap<u32, String> {
    check_store_with(root, why, false)
}

/// Like [`check_store`]; with `gaps_ok` (versions were deleted) numbers need only increase.
fn check_store_with(root: &Path, why: &str, gaps_ok: bool) -> BTreeMap<u32, String> {
    let store = ArtifactStore::open_existing(root).expect("open");
    let versions = store.list(Some("default")).expect("list");
    let numbers: Vec<u64> = versions
        .iter()
        .map(|v| v.version[1..].parse().expect("vN"))
        .collect();
    if gaps_ok {
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "{why}: version numbers repeat: {numbers:?}"
        );
    } else {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(
            numbers, expected,
            "{why}: version numbers are not 1..=n without gaps"
        );
    }
    let mut by_trial = BTreeMap::new();
    for v in &versions {
        assert!(
            by_trial.insert(v.trial_id, v.version.clone()).is_none(),
            "{why}: trial {} registered twice",
            v.trial_id
        );
        // Fully registered: its folder is there and hashes to its hash; metrics and tags are in.
        let h = hash_adapter_dir(Path::new(&v.stored_path)).expect("stored folder readable");
        assert_eq!(
            h.hash, v.adapter_hash,
            "{why}: {} is half-stored",
            v.version
        );
        assert_eq!(v.metrics.len(), 1, "{why}: {} lost its metrics", v.version);
        assert_eq!(v.tags.len(), 1, "{why}: {} lost its tags", v.version);
    }
    let report = store
        .verify(None, "default", &SkillContext::new(root))
        .expect("verify");
    assert!(report.ok, "{why}: verify found {:?}", report.problems);
    by_trial
}

#[test]
fn concurrent_processes_never_lose_or_duplicate_a_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The store does not exist yet: the workers also race to create and migrate it.
    let root = tmp.path().join("store");
    let per_worker = 12;
    let jobs: Vec<Job> = (1..=3)
        .map(|w| Job {
            root: root.clone(),
            scratch: tmp.path().to_path_buf(),
            worker: w,
            count: per_worker,
            size: 64 * 1024,
            die_at: None,
        })
        .collect();
    let children: Vec<Child> = jobs.iter().map(spawn).collect();
    let mut acks = BTreeMap::new();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "worker failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        acks.extend(parse_acks(&String::from_utf8_lossy(&out.stdout)));
    }
    assert_eq!(acks.len(), 3 * per_worker as usize);
    let registered = check_store(&root, "after concurrent stores");
    assert_eq!(
        registered, acks,
        "the index and the acknowledgements disagree"
    );
    // Items 0, 5, 10 are the same adapter in every worker: stored once.
    let store = ArtifactStore::open_existing(&root).expect("open");
    let shared: BTreeSet<String> = store
        .list(None)
        .expect("list")
        .into_iter()
        .filter(|v| (v.trial_id % 10_000) % 5 == 0)
        .map(|v| v.stored_path)
        .collect();
    assert_eq!(shared.len(), 3, "identical adapters must share one folder");
}

fn seed() -> u64 {
    match std::env::var("LORA_ARTIFACT_KILL_SEED") {
        Ok(s) => s.parse().expect("LORA_ARTIFACT_KILL_SEED is a number"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

#[test]
fn writers_killed_at_random_points_leave_nothing_half_registered() {
    let seed = seed();
    let why = format!("seed {seed} (rerun with LORA_ARTIFACT_KILL_SEED={seed})");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    drop(ArtifactStore::open(&root).expect("create"));
    let mut all_acks: BTreeMap<u32, String> = BTreeMap::new();
    let ctx = SkillContext::new(tmp.path());
    for round in 0..8u32 {
        let job = Job {
            root: root.clone(),
            scratch: tmp.path().to_path_buf(),
            worker: 100 + round,
            count: 0,
            size: 2 * 1024 * 1024,
            die_at: None,
        };
        let mut child = spawn(&job);
        let delay = 20 + next() % 600;
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix.
        let out = child.wait_with_output().expect("wait");
        let acks = parse_acks(&String::from_utf8_lossy(&out.stdout));
        let registered = check_store(
            &root,
            &format!("round {round}, killed after {delay} ms, {why}"),
        );
        // Every acknowledged version is registered under the acknowledged name.
        for (t, v) in &acks {
            assert_eq!(
                registered.get(t),
                Some(v),
                "round {round}: acknowledged {t} {v} lost; {why}"
            );
        }
        all_acks.extend(acks);
        // The next store succeeds and takes the next number.
        let dir = tmp.path().join(format!("parent-{round}"));
        make_adapter(&dir, 9, round + 1, 1000);
        let o = ArtifactStore::open_existing(&root)
            .expect("open")
            .store(&input_for(&dir, 9, round + 1), &ctx)
            .expect("store after a kill");
        assert_eq!(o.version, format!("v{}", registered.len() + 1), "{why}");
    }
    // gc clears what the killed writers left, and breaks nothing.
    let mut store = ArtifactStore::open_existing(&root).expect("open");
    let r = store
        .gc(GcOptions::default(), &ctx)
        .expect("gc after kills");
    let registered = check_store(&root, &format!("after gc, {why}"));
    for (t, v) in &all_acks {
        assert_eq!(registered.get(t), Some(v), "{why}");
    }
    let again = store.gc(GcOptions::default(), &ctx).expect("gc");
    assert!(again.removed.is_empty(), "{again:?}");
    // Leftovers depend on where the kills landed; report them for the log.
    let _ = writeln!(
        std::io::stderr(),
        "kill test ({why}): {} versions, gc removed {} blobs, {} adapters, {} temp files",
        registered.len(),
        r.blobs_removed,
        r.adapters_removed,
        r.temp_removed
    );
}

#[test]
fn a_writer_killed_at_each_phase_leaves_nothing_half_registered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let ctx = SkillContext::new(tmp.path());
    let mut expected_versions = 0usize;
    for (k, phase) in ["hashed", "blobs_written", "adapter_published", "committed"]
        .into_iter()
        .enumerate()
    {
        let job = Job {
            root: root.clone(),
            scratch: tmp.path().to_path_buf(),
            worker: 200 + k as u32,
            count: 1,
            size: 256 * 1024,
            die_at: Some(phase.to_string()),
        };
        let out = spawn(&job).wait_with_output().expect("wait");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(out.status.signal(), Some(9), "{phase}: {:?}", out.status);
        }
        assert!(parse_acks(&String::from_utf8_lossy(&out.stdout)).is_empty());
        if phase == "committed" {
            expected_versions += 1;
        }
        let registered = check_store(&root, phase);
        assert_eq!(registered.len(), expected_versions, "{phase}");
        // The killed writer held the store lock; the kernel released it, so gc runs at once.
        let t = Instant::now();
        let r = ArtifactStore::open_existing(&root)
            .expect("open")
            .gc(
                GcOptions {
                    dry_run: false,
                    wait: Duration::from_secs(2),
                },
                &ctx,
            )
            .expect("gc is not blocked by a dead writer");
        assert!(t.elapsed() < Duration::from_secs(2));
        match phase {
            "hashed" => assert!(r.removed.is_empty(), "{phase}: {r:?}"),
            // Weights and notes; the config blob is shared with a registered version.
            "blobs_written" => assert_eq!((r.blobs_removed, r.adapters_removed), (2, 0), "{phase}"),
            "adapter_published" => {
                assert_eq!((r.blobs_removed, r.adapters_removed), (2, 1), "{phase}")
            }
            _ => assert!(r.removed.is_empty(), "{phase}: {r:?}"),
        }
        check_store(&root, &format!("{phase} after gc"));
        // The next store succeeds.
        let dir = tmp.path().join(format!("next-{k}"));
        make_adapter(&dir, 7, 100 + k as u32, 1000);
        let o = ArtifactStore::open(&root)
            .expect("open")
            .store(&input_for(&dir, 7, 100 + k as u32), &ctx)
            .expect("store after the kill");
        expected_versions += 1;
        assert_eq!(o.version, format!("v{expected_versions}"), "{phase}");
    }
}

#[test]
fn gc_running_beside_writer_processes_never_breaks_a_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let ctx = SkillContext::new(tmp.path());
    let mut store = ArtifactStore::open(&root).expect("create");
    let jobs: Vec<Job> = (1..=2)
        .map(|w| Job {
            root: root.clone(),
            scratch: tmp.path().to_path_buf(),
            worker: 300 + w,
            count: 15,
            size: 128 * 1024,
            die_at: None,
        })
        .collect();
    let mut children: Vec<Child> = jobs.iter().map(spawn).collect();
    let mut gcs = 0;
    let mut freed = 0;
    let mut deleted: BTreeSet<u32> = BTreeSet::new();
    // While they store: delete every version of the adapters all workers share
    // (items 0, 5, 10), so that gc removes exactly the blobs the other worker
    // may be storing again at that moment, and collect garbage.
    while children
        .iter_mut()
        .any(|c| matches!(c.try_wait(), Ok(None)))
    {
        for v in store.list(Some("default")).expect("list") {
            if (v.trial_id % 10_000).is_multiple_of(5) {
                store.delete(&v.version, "default").expect("delete");
                deleted.insert(v.trial_id);
            }
        }
        freed += store
            .gc(GcOptions::default(), &ctx)
            .expect("gc")
            .blobs_removed;
        gcs += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut acks = BTreeMap::new();
    for c in children {
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        acks.extend(parse_acks(&String::from_utf8_lossy(&out.stdout)));
    }
    assert!(gcs > 2, "gc ran only {gcs} times");
    assert!(freed > 0, "gc never had anything to remove");
    let registered = check_store_with(&root, "gc beside writers", true);
    for t in &deleted {
        acks.remove(t);
    }
    // Shared items stored after the last delete round are still registered.
    let late: BTreeMap<u32, String> = registered
        .iter()
        .filter(|(t, _)| !deleted.contains(t))
        .map(|(t, v)| (*t, v.clone()))
        .collect();
    assert_eq!(late, acks);
    let _ = writeln!(
        std::io::stderr(),
        "gc beside writers: {gcs} gc runs, {} versions deleted, {freed} blobs freed",
        deleted.len()
    );
}
