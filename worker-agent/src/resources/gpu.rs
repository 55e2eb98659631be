//! GPU discovery, once at start-up.
//!
//! Owns: finding NVIDIA Jetson/Tegra integrated GPUs (device tree), NVIDIA discrete GPUs
//! (`/proc/driver/nvidia/gpus/*/information`, else `nvidia-smi`) and parsing what those give.
//! Order matters: a Tegra board reports only its integrated GPU, because recent JetPack releases
//! ship an `nvidia-smi` that would list the same GPU again. The driver's procfs files are preferred
//! to `nvidia-smi`, which is slow to start and can hang on a wedged driver (it runs with a
//! deadline). Every lookup takes a root directory so tests can point it at a fixture tree.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_protocol::{Gpu, GpuVendor};
use tracing::debug;

/// How long `nvidia-smi` may take before it is killed and ignored.
const NVIDIA_SMI_DEADLINE: Duration = Duration::from_secs(10);

/// The GPUs of this machine (empty when none are found).
pub(crate) fn detect() -> Vec<Gpu> {
    detect_in(Path::new("/"), || {
        let smi = super::host::find_on_path("nvidia-smi")?;
        run_nvidia_smi(&smi)
    })
}

/// Detection against the tree under `root`; `nvidia_smi` yields the tool's CSV output, if any.
fn detect_in(root: &Path, nvidia_smi: impl FnOnce() -> Option<String>) -> Vec<Gpu> {
    if let Some(gpu) = tegra_gpu(root) {
        return vec![gpu];
    }
    let from_proc = nvidia_proc_gpus(root);
    if !from_proc.is_empty() {
        return from_proc;
    }
    match nvidia_smi() {
        Some(csv) => parse_nvidia_smi_csv(&csv),
        None => Vec::new(),
    }
}

/// The integrated GPU of a Jetson/Tegra board, from its device-tree `compatible` strings.
fn tegra_gpu(root: &Path) -> Option<Gpu> {
    let compatible = [
        "proc/device-tree/compatible",
        "sys/firmware/devicetree/base/compatible",
    ]
    .iter()
    .find_map(|p| fs::read(root.join(p)).ok())?;
    if !is_tegra_compatible(&compatible) {
        return None;
    }
    let model = [
        "proc/device-tree/model",
        "sys/firmware/devicetree/base/model",
    ]
    .iter()
    .find_map(|p| fs::read(root.join(p)).ok())
    .map(|bytes| device_tree_string(&bytes))
    .filter(|m| !m.is_empty())
    .unwrap_or_else(|| {
        debug!("Tegra board without a device-tree model");
        "NVIDIA Tegra".to_owned()
    });
    Some(Gpu {
        vendor: GpuVendor::NvidiaTegra,
        model,
        memory_bytes: None,
    })
}

/// Whether a device-tree `compatible` property (NUL-separated strings) names a Tegra SoC,
/// e.g. `nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0`.
pub(crate) fn is_tegra_compatible(compatible: &[u8]) -> bool {
    compatible
        .split(|&b| b == 0)
        .any(|s| s.starts_with(b"nvidia,tegra"))
}

/// A device-tree string property without its trailing NULs.
fn device_tree_string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches('\0')
        .trim()
        .to_owned()
}

/// One GPU per `/proc/driver/nvidia/gpus/<bus id>/information`, in bus order.
fn nvidia_proc_gpus(root: &Path) -> Vec<Gpu> {
    let dir = root.join("proc/driver/nvidia/gpus");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("information"))
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| match fs::read_to_string(p) {
            Ok(text) => parse_nvidia_information(&text),
            Err(err) => {
                debug!(path = %p.display(), %err, "cannot read NVIDIA GPU information");
                None
            }
        })
        .collect()
}

/// The GPU described by an NVIDIA driver `information` file (its `Model:` line).
/// The file has no memory size.
pub(crate) fn parse_nvidia_information(text: &str) -> Option<Gpu> {
    let model = text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == "Model").then(|| v.trim())
    })?;
    if model.is_empty() {
        return None;
    }
    Some(Gpu {
        vendor: GpuVendor::Nvidia,
        model: model.to_owned(),
        memory_bytes: None,
    })
}

/// Parses `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`: one
/// `name, MiB` line per GPU. A memory figure that is not a number (`[N/A]`) gives `None`.
pub(crate) fn parse_nvidia_smi_csv(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() {
                return None;
            }
            let (name, mem) = match line.rsplit_once(',') {
                Some((name, mem)) => (name.trim(), mem.trim().parse::<u64>().ok()),
                None => (line, None),
            };
            if name.is_empty() {
                return None;
            }
            Some(Gpu {
                vendor: GpuVendor::Nvidia,
                model: name.to_owned(),
                memory_bytes: mem.map(|mib| mib.saturating_mul(1024 * 1024)),
            })
        })
        .collect()
}

/// Runs `nvidia-smi` with a deadline; its stdout on success.
fn run_nvidia_smi(smi: &Path) -> Option<String> {
    let mut child = Command::new(smi)
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| debug!(path = %smi.display(), %err, "cannot start nvidia-smi"))
        .ok()?;
    let started = Instant::now();
    // The output is a few short lines: it fits in the pipe, so polling before reading cannot
    // deadlock.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < NVIDIA_SMI_DEADLINE => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                debug!(deadline = ?NVIDIA_SMI_DEADLINE, "nvidia-smi timed out; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Err(err) => {
                debug!(%err, "waiting for nvidia-smi failed");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    if !status.success() {
        debug!(%status, "nvidia-smi failed");
        return None;
    }
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFORMATION: &str = "Model: \t\t NVIDIA GeForce RTX 3090\nIRQ:   \t\t 139\n\
        GPU UUID: \t GPU-5c5e1e52-0c5d-2b3c-9e0f-3a1b2c3d4e5f\nVideo BIOS: \t 94.02.42.00.a9\n\
        Bus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\n\
        Bus Location: \t 0000:01:00.0\nDevice Minor: \t 0\nGPU Excluded:\t No\n";

    #[test]
    fn nvidia_information_file() {
        assert_eq!(
            parse_nvidia_information(INFORMATION),
            Some(Gpu {
                vendor: GpuVendor::Nvidia,
                model: "NVIDIA GeForce RTX 3090".into(),
                memory_bytes: None,
            })
        );
        assert_eq!(parse_nvidia_information("IRQ: 139\n"), None);
        assert_eq!(parse_nvidia_information("Model: \t\n"), None);
    }

    #[test]
    fn nvidia_smi_csv() {
        let csv = "NVIDIA GeForce RTX 3090, 24576\nTesla T4, 15360\nOrin (nvgpu), [N/A]\n\n";
        let gpus = parse_nvidia_smi_csv(csv);
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus[0].model, "NVIDIA GeForce RTX 3090");
        assert_eq!(gpus[0].memory_bytes, Some(24576 * 1024 * 1024));
        assert_eq!(gpus[1].model, "Tesla T4");
        assert_eq!(gpus[2].model, "Orin (nvgpu)");
        assert_eq!(gpus[2].memory_bytes, None);
        assert!(gpus.iter().all(|g| g.vendor == GpuVendor::Nvidia));
        assert!(parse_nvidia_smi_csv("").is_empty());
    }

    #[test]
    fn tegra_compatible_string() {
        assert!(is_tegra_compatible(
            b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0"
        ));
        assert!(is_tegra_compatible(
            b"nvidia,jetson-nano\0nvidia,tegra210\0"
        ));
    }

    #[test]
    fn non_tegra_compatible_string() {
        assert!(!is_tegra_compatible(
            b"raspberrypi,4-model-b\0brcm,bcm2711\0"
        ));
        assert!(!is_tegra_compatible(b"rockchip,rk3588\0"));
        assert!(!is_tegra_compatible(b""));
    }

    fn write(root: &Path, rel: &str, contents: &[u8]) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, contents).expect("write");
    }

    #[test]
    fn tegra_board_reports_only_its_integrated_gpu() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "proc/device-tree/compatible",
            b"nvidia,p3768-0000+p3767-0005\0nvidia,tegra234\0",
        );
        write(
            dir.path(),
            "proc/device-tree/model",
            b"NVIDIA Jetson Orin Nano Developer Kit\0",
        );
        let gpus = detect_in(dir.path(), || Some("Orin (nvgpu), [N/A]\n".into()));
        assert_eq!(
            gpus,
            vec![Gpu {
                vendor: GpuVendor::NvidiaTegra,
                model: "NVIDIA Jetson Orin Nano Developer Kit".into(),
                memory_bytes: None,
            }]
        );
    }

    #[test]
    fn proc_files_before_nvidia_smi() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "proc/device-tree/compatible", b"brcm,bcm2711\0");
        write(
            dir.path(),
            "proc/driver/nvidia/gpus/0000:02:00.0/information",
            b"Model: \t\t Tesla T4\n",
        );
        write(
            dir.path(),
            "proc/driver/nvidia/gpus/0000:01:00.0/information",
            INFORMATION.as_bytes(),
        );
        let gpus = detect_in(dir.path(), || panic!("nvidia-smi must not run"));
        let models: Vec<_> = gpus.iter().map(|g| g.model.as_str()).collect();
        assert_eq!(models, ["NVIDIA GeForce RTX 3090", "Tesla T4"]);
    }

    #[test]
    fn nvidia_smi_when_no_proc_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(detect_in(dir.path(), || None).is_empty());
        let gpus = detect_in(dir.path(), || Some("Tesla T4, 15360\n".into()));
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].memory_bytes, Some(15360 * 1024 * 1024));
    }
}
