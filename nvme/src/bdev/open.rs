//! The one place a device named by a configuration (or on `stagerctl`'s command line) is
//! opened: a [`DeviceSpec`] says which driver and what it needs, [`open_device`] returns the
//! `BlockDevice`. `stagerd`'s flash devices and namespace backends and the offline tools all
//! come through here, so a new driver is added once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AlignedBuf, BdevIo, BdevOp, BlockDevice, FileDevice, PassthruDevice, VfioDevice};
use crate::uring::{split, Ring};

/// A local block device and how to drive it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A file or block device through io_uring (O_DIRECT unless `direct` is false); a file is
    /// created or extended to `size_bytes` when given.
    File { path: PathBuf, size_bytes: Option<u64>, block_size: u32, direct: bool },
    /// An NVMe namespace's generic character device (`/dev/ngXnY`) through io_uring passthrough.
    NvmePassthru { path: PathBuf, block_size: u32 },
    /// An NVMe controller bound to vfio-pci, driven by our userspace driver (its first active
    /// namespace).
    Vfio { pci: String, block_size: u32 },
}

impl DeviceSpec {
    /// How logs and messages name the device.
    pub fn label(&self) -> String {
        match self {
            DeviceSpec::File { path, .. } | DeviceSpec::NvmePassthru { path, .. } => path.display().to_string(),
            DeviceSpec::Vfio { pci, .. } => format!("vfio:{pci}"),
        }
    }

    /// The configuration spelling of the driver (`kind:`).
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::File { .. } => "file",
            DeviceSpec::NvmePassthru { .. } => "nvme-passthru",
            DeviceSpec::Vfio { .. } => "vfio",
        }
    }

    /// The path to lock for exclusive ownership, if the device has one. A VFIO device has
    /// none: its IOMMU group can be open in one process at a time, which is the lock.
    pub fn lock_path(&self) -> Option<&Path> {
        match self {
            DeviceSpec::File { path, .. } | DeviceSpec::NvmePassthru { path, .. } => Some(path),
            DeviceSpec::Vfio { .. } => None,
        }
    }

    /// A device named on a command line: `vfio:ADDRESS` or a bare PCI address is a VFIO
    /// controller, a character device is an NVMe generic device, anything else a file or
    /// block device (used at its size, O_DIRECT).
    pub fn from_arg(arg: &str, block_size: u32) -> Result<DeviceSpec, String> {
        if let Some(pci) = arg.strip_prefix("vfio:") {
            return Ok(DeviceSpec::Vfio { pci: super::vfio::pci_address(pci)?, block_size });
        }
        let path = PathBuf::from(arg);
        if !path.exists() {
            if let Ok(pci) = super::vfio::pci_address(arg) {
                return Ok(DeviceSpec::Vfio { pci, block_size });
            }
        }
        let is_char =
            std::fs::metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()));
        Ok(if is_char {
            DeviceSpec::NvmePassthru { path, block_size }
        } else {
            DeviceSpec::File { path, size_bytes: None, block_size, direct: true }
        })
    }
}

/// Opens the device `spec` names.
pub fn open_device(spec: &DeviceSpec) -> std::io::Result<Arc<dyn BlockDevice>> {
    Ok(match spec {
        DeviceSpec::File { path, size_bytes, block_size, direct } => {
            Arc::new(FileDevice::open(path, *size_bytes, *block_size, *direct)?)
        }
        DeviceSpec::NvmePassthru { path, block_size } => Arc::new(PassthruDevice::open(path, *block_size)?),
        DeviceSpec::Vfio { pci, block_size } => Arc::new(VfioDevice::open(pci, *block_size)?),
    })
}

/// Reads `len` bytes at `offset` outside any reactor, on a channel and ring of its own (a
/// superblock probe before the engine opens the device; tests). Gives up after `timeout`.
pub fn read_blocking(dev: &dyn BlockDevice, offset: u64, len: usize, timeout: Duration) -> std::io::Result<AlignedBuf> {
    let io = BdevIo::new(BdevOp::Read, offset, len as u64, Some(AlignedBuf::new(len)), 0);
    let buf = run_blocking(dev, io, timeout)?;
    buf.ok_or_else(|| std::io::Error::other("read buffer lost"))
}

/// Writes `buf` at `offset` durably (FUA) outside any reactor, like [`read_blocking`] (an
/// operator's `stagerctl flash wipe`).
pub fn write_blocking(dev: &dyn BlockDevice, offset: u64, buf: AlignedBuf, timeout: Duration) -> std::io::Result<()> {
    let io = BdevIo::new(BdevOp::Write { fua: true }, offset, buf.len() as u64, Some(buf), 0);
    run_blocking(dev, io, timeout).map(|_| ())
}

fn run_blocking(dev: &dyn BlockDevice, io: BdevIo, timeout: Duration) -> std::io::Result<Option<AlignedBuf>> {
    let offset = io.offset;
    let what = if matches!(io.op, BdevOp::Read) { "read" } else { "write" };
    let mut ch = dev.channel(0)?;
    let mut ring = Ring::new(16)?;
    ch.submit(io, &mut ring);
    let start = Instant::now();
    let (mut cqes, mut done) = (Vec::new(), Vec::new());
    loop {
        if ch.poll(&mut done) > 0 {
            break;
        }
        if start.elapsed() > timeout {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{}: a {what} did not complete within {} s", dev.info().name, timeout.as_secs()),
            ));
        }
        cqes.clear();
        ring.submit_and_wait(Duration::from_millis(1), &mut cqes)?;
        for &(ud, res) in &cqes {
            let (_, _, slot) = split(ud);
            ch.on_cqe(slot, res, &mut ring);
        }
    }
    let d = done.pop().ok_or_else(|| std::io::Error::other("no completion"))?;
    d.result.map_err(|e| std::io::Error::other(format!("{}: {what} at {offset}: {e}", dev.info().name)))?;
    Ok(d.buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_names() {
        assert_eq!(
            DeviceSpec::from_arg("vfio:00:04.0", 4096),
            Ok(DeviceSpec::Vfio { pci: "0000:00:04.0".into(), block_size: 4096 })
        );
        assert_eq!(
            DeviceSpec::from_arg("0000:00:03.0", 4096),
            Ok(DeviceSpec::Vfio { pci: "0000:00:03.0".into(), block_size: 4096 })
        );
        assert!(DeviceSpec::from_arg("vfio:nonsense", 4096).is_err());
        // /dev/null is a character device: a passthrough device by its type.
        assert_eq!(
            DeviceSpec::from_arg("/dev/null", 4096),
            Ok(DeviceSpec::NvmePassthru { path: "/dev/null".into(), block_size: 4096 })
        );
        let f = DeviceSpec::from_arg("./flash.img", 4096).unwrap();
        assert_eq!((f.kind(), f.label()), ("file", "./flash.img".to_string()));
        assert_eq!(DeviceSpec::Vfio { pci: "0000:00:04.0".into(), block_size: 4096 }.lock_path(), None);
    }

    #[test]
    fn a_file_opens_and_reads_through_the_one_function() {
        let dir = std::env::temp_dir().join(format!("stager-open-test-{}", std::process::id()));
        let path = dir.join("dev.img");
        std::fs::create_dir_all(&dir).unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[8192..8192 + 5].copy_from_slice(b"hello");
        std::fs::write(&path, &data).unwrap();
        let dev =
            open_device(&DeviceSpec::File { path: path.clone(), size_bytes: None, block_size: 4096, direct: true })
                .unwrap();
        assert_eq!(dev.info().blocks, 256);
        let b = read_blocking(&*dev, 8192, 4096, Duration::from_secs(5)).unwrap();
        assert_eq!(&b[..5], b"hello");
        let e =
            open_device(&DeviceSpec::NvmePassthru { path: path.clone(), block_size: 4096 }).err().unwrap().to_string();
        assert!(e.contains("not a character device"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
