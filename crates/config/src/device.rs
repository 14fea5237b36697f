//! The device table: memory, peak dense tensor throughput and memory
//! bandwidth of common accelerators, and a CPU entry.
//!
//! `peak_tflops` is the vendor's dense (no sparsity) figure for the
//! precision training runs in: BF16 with FP32 accumulation where the chip has
//! BF16, else FP16 with FP32 accumulation (V100, T4). GeForce cards (RTX
//! 3090/4090) run FP32-accumulate at half their FP16-accumulate rate, and the
//! half rate is the one listed. For the CPU the figure is per thread and is
//! the FP32 GEMM rate measured on the project machine (see
//! `shared/anchors/README.md`: 130-155 GFLOP/s on 2 threads).

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A CUDA GPU.
    Cuda,
    /// The CPU.
    Cpu,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Canonical name (`rtx-4090`, `a100-80gb`, `cpu`).
    pub name: String,
    /// GPU or CPU.
    pub kind: DeviceKind,
    /// Device memory, GB (10^9 bytes); for the CPU, what the caller plans to allow.
    pub memory_gb: f64,
    /// Peak dense tensor throughput in the training precision, TFLOP/s (CPU: per thread).
    pub peak_tflops: f64,
    /// Memory bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Whether it computes in bfloat16 natively.
    pub bf16: bool,
}

impl DeviceSpec {
    fn gpu(name: &str, memory_gb: f64, peak_tflops: f64, bandwidth_gbs: f64, bf16: bool) -> Self {
        Self {
            name: name.into(),
            kind: DeviceKind::Cuda,
            memory_gb,
            peak_tflops,
            bandwidth_gbs,
            bf16,
        }
    }

    /// The CPU with `threads` threads and `memory_gb` of RAM to use.
    pub fn cpu(threads: u32, memory_gb: f64) -> Self {
        let t = f64::from(threads.max(1));
        Self {
            name: "cpu".into(),
            kind: DeviceKind::Cpu,
            memory_gb,
            peak_tflops: CPU_TFLOPS_PER_THREAD * t,
            // Two channels of DDR4/DDR5 shared by the threads.
            bandwidth_gbs: 20.0,
            bf16: false,
        }
    }

    /// A GPU we know nothing about except its memory: RTX 4090-class throughput.
    pub fn generic_gpu(memory_gb: f64) -> Self {
        Self {
            name: "gpu".into(),
            memory_gb,
            ..Self::gpu("gpu", memory_gb, 165.2, 1008.0, true)
        }
    }

    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        self.kind == DeviceKind::Cpu
    }
}

/// FP32 GEMM rate per CPU thread, TFLOP/s (measured: ~70 GFLOP/s per thread on
/// the project's 2-core AVX2 machine).
pub const CPU_TFLOPS_PER_THREAD: f64 = 0.070;

/// Every GPU in the table.
pub fn gpus() -> Vec<DeviceSpec> {
    vec![
        DeviceSpec::gpu("h100", 80.0, 989.4, 3350.0, true),
        DeviceSpec::gpu("h100-pcie", 80.0, 756.0, 2000.0, true),
        DeviceSpec::gpu("h200", 141.0, 989.4, 4800.0, true),
        DeviceSpec::gpu("a100-80gb", 80.0, 312.0, 2039.0, true),
        DeviceSpec::gpu("a100-40gb", 40.0, 312.0, 1555.0, true),
        DeviceSpec::gpu("l40s", 48.0, 362.1, 864.0, true),
        DeviceSpec::gpu("a6000", 48.0, 154.8, 768.0, true),
        DeviceSpec::gpu("l4", 24.0, 121.0, 300.0, true),
        DeviceSpec::gpu("a10", 24.0, 125.0, 600.0, true),
        DeviceSpec::gpu("v100", 32.0, 125.0, 900.0, false),
        DeviceSpec::gpu("v100-16gb", 16.0, 125.0, 900.0, false),
        DeviceSpec::gpu("t4", 16.0, 65.0, 320.0, false),
        DeviceSpec::gpu("rtx-3090", 24.0, 71.0, 936.0, true),
        DeviceSpec::gpu("rtx-4090", 24.0, 165.2, 1008.0, true),
    ]
}

/// Canonical device names, CPU included.
pub fn names() -> Vec<String> {
    let mut v: Vec<String> = gpus().into_iter().map(|d| d.name).collect();
    v.push("cpu".into());
    v
}

/// Looks a device up by a loose name: `RTX 4090`, `rtx4090`, `4090`,
/// `A100` (the 80 GB part), `a100-40`, `H100 SXM`, `cpu`.
pub fn lookup(name: &str, cpu_threads: u32, cpu_memory_gb: f64) -> Result<DeviceSpec, ConfigError> {
    let key: String = name
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let key = key
        .trim_start_matches("nvidia")
        .trim_start_matches("geforce")
        .trim_end_matches("sxm")
        .trim_end_matches("sxm5")
        .to_string();
    let canon = match key.as_str() {
        "cpu" => return Ok(DeviceSpec::cpu(cpu_threads, cpu_memory_gb)),
        "h100" | "h10080gb" | "h100sxm5" => "h100",
        "h100pcie" => "h100-pcie",
        "h200" | "h200141gb" => "h200",
        "a100" | "a10080gb" | "a10080" => "a100-80gb",
        "a10040gb" | "a10040" => "a100-40gb",
        "l40s" => "l40s",
        "a6000" | "rtxa6000" => "a6000",
        "l4" => "l4",
        "a10" | "a10g" => "a10",
        "v100" | "v10032gb" | "v10032" => "v100",
        "v10016gb" | "v10016" => "v100-16gb",
        "t4" => "t4",
        "rtx3090" | "3090" => "rtx-3090",
        "rtx4090" | "4090" => "rtx-4090",
        _ => {
            return Err(ConfigError::UnknownDevice {
                name: name.into(),
                known: names(),
            });
        }
    };
    gpus()
        .into_iter()
        .find(|d| d.name == canon)
        .ok_or_else(|| ConfigError::UnknownDevice {
            name: name.into(),
            known: names(),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::print_stderr)] // Tests: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn loose_names_resolve() {
        for (q, want) in [
            ("RTX 4090", "rtx-4090"),
            ("rtx4090", "rtx-4090"),
            ("NVIDIA A100", "a100-80gb"),
            ("a100-40gb", "a100-40gb"),
            ("H100 SXM", "h100"),
            ("A10G", "a10"),
            ("cpu", "cpu"),
        ] {
            assert_eq!(lookup(q, 2, 24.0).unwrap().name, want, "{q}");
        }
        let e = lookup("tpu-v5", 2, 24.0).unwrap_err();
        assert!(e.to_string().contains("tpu-v5"));
        assert!(lookup("t4", 1, 1.0).map(|d| !d.bf16).unwrap());
        assert!((lookup("cpu", 2, 24.0).unwrap().peak_tflops - 0.14).abs() < 1e-9);
    }
}
