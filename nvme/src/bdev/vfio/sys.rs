//! The Linux side of the VFIO driver: checking that a PCI function is an NVMe controller bound
//! to `vfio-pci` (and saying how to bind it when it is not), the container / group / device
//! file descriptors, BAR0 mapped into our address space, bus mastering, and DMA memory mapped
//! in the IOMMU (type 1 v2). The kernel ABI (ioctl numbers and structures) is written out here
//! rather than taken from a binding crate: it is small, stable, and all of it is below.
//!
//! DMA addresses (IOVAs) are handed out from 4 GiB upwards and never reused, with an unmapped
//! page between regions: a controller writing late, or past the end of a region, hits an
//! unmapped address and faults in the IOMMU rather than writing memory that now holds
//! something else.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::dma::{DmaMapper, DmaRegion};
use super::regs::Registers;

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
// _IO(';', 100 + n)
const VFIO_GET_API_VERSION: u32 = 0x3B64;
const VFIO_CHECK_EXTENSION: u32 = 0x3B65;
const VFIO_SET_IOMMU: u32 = 0x3B66;
const VFIO_GROUP_GET_STATUS: u32 = 0x3B67;
const VFIO_GROUP_SET_CONTAINER: u32 = 0x3B68;
const VFIO_GROUP_GET_DEVICE_FD: u32 = 0x3B6A;
const VFIO_DEVICE_GET_REGION_INFO: u32 = 0x3B6C;
const VFIO_IOMMU_MAP_DMA: u32 = 0x3B71;
const VFIO_IOMMU_UNMAP_DMA: u32 = 0x3B72;

const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// PCI class code of an NVM Express controller: mass storage, non-volatile memory, NVMe.
const PCI_CLASS_NVME: u32 = 0x01_08_02;

/// The first IOVA handed out: above the 32-bit MSI window, far below any IOMMU's address width.
const IOVA_BASE: u64 = 1 << 32;
/// Unmapped gap after each region.
const IOVA_GUARD: u64 = 4096;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// A PCI address as the kernel spells it (`0000:00:04.0`); `00:04.0` gets domain 0.
pub fn pci_address(s: &str) -> Result<String, String> {
    let bad = || format!("`{s}` is not a PCI address like 0000:00:04.0");
    let s = s.trim().to_ascii_lowercase();
    let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s.clone() };
    let (domain, rest) = full.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |f: &str, width: usize, max: u32| {
        (f.len() == width && f.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(f, 16).ok())
            .flatten()
            .filter(|v| *v <= max)
    };
    if hex(domain, 4, 0xFFFF).is_none()
        || hex(bus, 2, 0xFF).is_none()
        || hex(dev, 2, 0x1F).is_none()
        || hex(func, 1, 7).is_none()
    {
        return Err(bad());
    }
    Ok(full)
}

fn bind_hint(pci: &str) -> String {
    format!(
        "bind it to vfio-pci as root: modprobe vfio-pci; echo {pci} > /sys/bus/pci/devices/{pci}/driver/unbind; \
         echo vfio-pci > /sys/bus/pci/devices/{pci}/driver_override; echo {pci} > /sys/bus/pci/drivers/vfio-pci/bind"
    )
}

fn link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p).ok()?.file_name()?.to_str().map(str::to_string)
}

/// Checks that `pci` (as [`pci_address`] returns it) is an NVMe controller bound to vfio-pci
/// with an IOMMU group whose device node exists; returns the group. The error says what is
/// wrong and how to fix it.
pub fn check_bound(pci: &str) -> Result<u32, String> {
    let dev = PathBuf::from("/sys/bus/pci/devices").join(pci);
    if !dev.exists() {
        return Err(format!("no PCI device {pci} on this machine (lspci -D lists them)"));
    }
    if let Ok(class) = std::fs::read_to_string(dev.join("class")) {
        let class = u32::from_str_radix(class.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        if class != PCI_CLASS_NVME {
            return Err(format!("{pci} is not an NVMe controller (PCI class {class:#08x})"));
        }
    }
    match link_name(&dev.join("driver")) {
        Some(d) if d == "vfio-pci" => {}
        Some(d) => return Err(format!("{pci} is bound to the `{d}` driver, not vfio-pci; {}", bind_hint(pci))),
        None => return Err(format!("{pci} is bound to no driver; {}", bind_hint(pci))),
    }
    let group = link_name(&dev.join("iommu_group")).and_then(|g| g.parse::<u32>().ok()).ok_or_else(|| {
        format!(
            "{pci} has no IOMMU group: this kernel runs without an IOMMU (enable VT-d/AMD-Vi, e.g. intel_iommu=on; \
             in QEMU add -machine q35 -device intel-iommu,intremap=on); VFIO needs one"
        )
    })?;
    let node = PathBuf::from(format!("/dev/vfio/{group}"));
    if !node.exists() {
        return Err(format!("{} is missing although {pci} is bound to vfio-pci", node.display()));
    }
    Ok(group)
}

/// ioctl with an argument pointer or value; returns the result or the OS error.
///
/// # Safety
/// `arg` must be what `request` expects (a live structure of the right layout, or a value).
unsafe fn vfio_ioctl(fd: &File, request: u32, arg: libc::c_ulong) -> std::io::Result<i32> {
    // SAFETY: forwarded from the caller.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn region_info(device: &File, index: u32) -> std::io::Result<RegionInfo> {
    let mut info = RegionInfo { argsz: std::mem::size_of::<RegionInfo>() as u32, index, ..RegionInfo::default() };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO fills a `struct vfio_region_info` (argsz says its
    // size, so the kernel writes no capabilities past it); `info` lives across the call.
    unsafe { vfio_ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &mut info as *mut RegionInfo as libc::c_ulong)? };
    Ok(info)
}

/// The container: the IOMMU context DMA memory is mapped into. Holds the group open, which
/// keeps the group attached to it.
struct Container {
    fd: File,
    _group: File,
    next_iova: AtomicU64,
    me: Weak<Container>,
}

impl DmaMapper for Container {
    fn alloc(&self, len: usize) -> std::io::Result<DmaRegion> {
        let len = len.max(1).next_multiple_of(4096);
        // SAFETY: an anonymous private mapping; we check for failure before using it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(format!("cannot allocate {len} bytes of DMA memory: {}", std::io::Error::last_os_error())));
        }
        let iova = self.next_iova.fetch_add(len as u64 + IOVA_GUARD, Ordering::SeqCst);
        let map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: ptr as u64,
            iova,
            size: len as u64,
        };
        // SAFETY: `map` is a live `struct vfio_iommu_type1_dma_map` describing memory we own.
        if let Err(e) = unsafe { vfio_ioctl(&self.fd, VFIO_IOMMU_MAP_DMA, &map as *const DmaMap as libc::c_ulong) } {
            // SAFETY: unmapping the mapping made above, which nothing else uses.
            unsafe { libc::munmap(ptr, len) };
            let hint = if e.raw_os_error() == Some(libc::ENOMEM) {
                " (pinned memory counts against RLIMIT_MEMLOCK: raise it, or run with CAP_IPC_LOCK)"
            } else {
                ""
            };
            return Err(err(format!("cannot map {len} bytes for DMA at IOVA {iova:#x}: {e}{hint}")));
        }
        let Some(container) = self.me.upgrade() else {
            return Err(err("VFIO container closed".into()));
        };
        let addr = ptr as usize;
        let release = Box::new(move || {
            let unmap = DmaUnmap { argsz: std::mem::size_of::<DmaUnmap>() as u32, flags: 0, iova, size: len as u64 };
            // SAFETY: `unmap` is a live `struct vfio_iommu_type1_dma_unmap` for a mapping we made.
            let r =
                unsafe { vfio_ioctl(&container.fd, VFIO_IOMMU_UNMAP_DMA, &unmap as *const DmaUnmap as libc::c_ulong) };
            match r {
                // SAFETY: the device can no longer reach the memory; nothing else refers to it.
                Ok(_) => unsafe {
                    libc::munmap(addr as *mut libc::c_void, len);
                },
                Err(e) => tracing::error!("cannot unmap DMA memory at IOVA {iova:#x}: {e}; leaking it"),
            }
        });
        let ptr = NonNull::new(ptr as *mut u8).ok_or_else(|| err("mmap returned NULL".into()))?;
        // SAFETY: ptr is valid for len zeroed bytes (anonymous mapping), mapped for the device at
        // iova; `release` unmaps it from the IOMMU, then from our address space.
        Ok(unsafe { DmaRegion::from_raw(ptr, iova, len, release) })
    }
}

/// BAR0 mapped into our address space.
struct MmioBar {
    base: NonNull<u8>,
    len: usize,
    _device: File,
}

// SAFETY: the mapping is device registers; concurrent 32-bit accesses from several threads are
// what the controller is built for (each queue has its own doorbell).
unsafe impl Send for MmioBar {}
// SAFETY: as above.
unsafe impl Sync for MmioBar {}

impl Registers for MmioBar {
    fn bar_bytes(&self) -> usize {
        self.len
    }
    fn read32(&self, offset: usize) -> u32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len, "register {offset:#x} outside BAR0");
        // SAFETY: inside the mapping (asserted), 4-byte aligned; volatile: it is MMIO.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(offset) as *const u32) }
    }
    fn write32(&self, offset: usize, value: u32) {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len, "register {offset:#x} outside BAR0");
        // SAFETY: as in read32.
        unsafe { std::ptr::write_volatile(self.base.as_ptr().add(offset) as *mut u32, value) }
    }
}

impl Drop for MmioBar {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping of BAR0; no reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// BAR0 through read/write on the device file, where the kernel does not let us map it: a
/// system call per register access, correct but slow (the driver warns).
struct FileBar {
    device: File,
    offset: u64,
    len: usize,
}

impl Registers for FileBar {
    fn bar_bytes(&self) -> usize {
        self.len
    }
    fn read32(&self, offset: usize) -> u32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len, "register {offset:#x} outside BAR0");
        let mut b = [0u8; 4];
        match self.device.read_exact_at(&mut b, self.offset + offset as u64) {
            Ok(()) => u32::from_le_bytes(b),
            // What a gone device reads as: the driver's health check fails it.
            Err(_) => u32::MAX,
        }
    }
    fn write32(&self, offset: usize, value: u32) {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len, "register {offset:#x} outside BAR0");
        if let Err(e) = self.device.write_all_at(&value.to_le_bytes(), self.offset + offset as u64) {
            tracing::error!("BAR0 write at {offset:#x} failed: {e}");
        }
    }
}

/// A controller opened: its name, its registers and its DMA allocator.
pub(crate) type Opened = (String, Arc<dyn Registers>, Arc<dyn DmaMapper>);

/// Opens the controller at `pci`: checks, attaches its group to a new container, maps BAR0,
/// enables bus mastering. Returns its name, its registers and its DMA allocator.
pub(crate) fn open(pci: &str) -> std::io::Result<Opened> {
    let pci = pci_address(pci).map_err(err)?;
    let group_id = check_bound(&pci).map_err(err)?;
    let name = format!("vfio {pci}");
    let open_rw = |p: &str| OpenOptions::new().read(true).write(true).open(p);
    let container =
        open_rw("/dev/vfio/vfio").map_err(|e| err(format!("{name}: /dev/vfio/vfio: {e} (modprobe vfio)")))?;
    // SAFETY: VFIO_GET_API_VERSION takes no argument.
    let api = unsafe { vfio_ioctl(&container, VFIO_GET_API_VERSION, 0)? };
    if api != VFIO_API_VERSION {
        return Err(err(format!("{name}: unknown VFIO API version {api}")));
    }
    // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value.
    let has = |t: libc::c_ulong| unsafe { vfio_ioctl(&container, VFIO_CHECK_EXTENSION, t) }.is_ok_and(|r| r > 0);
    let iommu_type = if has(VFIO_TYPE1V2_IOMMU) {
        VFIO_TYPE1V2_IOMMU
    } else if has(VFIO_TYPE1_IOMMU) {
        VFIO_TYPE1_IOMMU
    } else {
        return Err(err(format!("{name}: the kernel's VFIO has no type 1 IOMMU (modprobe vfio_iommu_type1)")));
    };
    let group_path = format!("/dev/vfio/{group_id}");
    let group = open_rw(&group_path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            err(format!("{name}: {group_path} is in use by another process (a running stagerd, or stagerctl)"))
        } else {
            err(format!("{name}: {group_path}: {e}"))
        }
    })?;
    let mut status = GroupStatus { argsz: std::mem::size_of::<GroupStatus>() as u32, flags: 0 };
    // SAFETY: VFIO_GROUP_GET_STATUS fills a live `struct vfio_group_status`.
    unsafe { vfio_ioctl(&group, VFIO_GROUP_GET_STATUS, &mut status as *mut GroupStatus as libc::c_ulong)? };
    if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(err(format!(
            "{name}: IOMMU group {group_id} is not viable: every device in it must be bound to vfio-pci \
             (ls /sys/kernel/iommu_groups/{group_id}/devices)"
        )));
    }
    let cfd: i32 = container.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads an int (the container's descriptor) through the
    // pointer; `cfd` lives across the call.
    unsafe { vfio_ioctl(&group, VFIO_GROUP_SET_CONTAINER, &cfd as *const i32 as libc::c_ulong) }
        .map_err(|e| err(format!("{name}: attaching group {group_id} to a VFIO container: {e}")))?;
    // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
    unsafe { vfio_ioctl(&container, VFIO_SET_IOMMU, iommu_type) }.map_err(|e| {
        err(format!(
            "{name}: VFIO_SET_IOMMU: {e} (without interrupt remapping the kernel refuses unless \
             vfio_iommu_type1.allow_unsafe_interrupts=1; in QEMU use intel-iommu,intremap=on)"
        ))
    })?;
    let cname = std::ffi::CString::new(pci.clone()).map_err(|_| err(format!("{name}: bad address")))?;
    // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated device name through the pointer
    // and returns a new descriptor, which we own from here.
    let dfd = unsafe { vfio_ioctl(&group, VFIO_GROUP_GET_DEVICE_FD, cname.as_ptr() as libc::c_ulong) }
        .map_err(|e| err(format!("{name}: cannot get the device from its group: {e}")))?;
    // SAFETY: dfd is a new descriptor nothing else owns.
    let device = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dfd) };
    let config = region_info(&device, VFIO_PCI_CONFIG_REGION_INDEX)?;
    let mut cmd = [0u8; 2];
    device.read_exact_at(&mut cmd, config.offset + PCI_COMMAND)?;
    let command = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    device.write_all_at(&command.to_le_bytes(), config.offset + PCI_COMMAND)?;
    let bar = region_info(&device, VFIO_PCI_BAR0_REGION_INDEX)?;
    let len = bar.size as usize;
    if len < 0x2000 {
        return Err(err(format!("{name}: BAR0 is {len} bytes, too small for an NVMe controller")));
    }
    let regs: Arc<dyn Registers> = if bar.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
        // SAFETY: maps the BAR0 region of our device descriptor at the offset VFIO gave; we
        // check for failure before using it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                bar.offset as libc::off_t,
            )
        };
        match NonNull::new(p as *mut u8).filter(|_| p != libc::MAP_FAILED) {
            Some(base) => Arc::new(MmioBar { base, len, _device: device }),
            None => {
                tracing::warn!(device = %name, "cannot mmap BAR0 ({}); using read/write", std::io::Error::last_os_error());
                Arc::new(FileBar { device, offset: bar.offset, len })
            }
        }
    } else {
        tracing::warn!(device = %name, "BAR0 cannot be mapped; register access by read/write (slow)");
        Arc::new(FileBar { device, offset: bar.offset, len })
    };
    let dma: Arc<dyn DmaMapper> = Arc::new_cyclic(|me| Container {
        fd: container,
        _group: group,
        next_iova: AtomicU64::new(IOVA_BASE),
        me: me.clone(),
    });
    Ok((name, regs, dma))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        assert_eq!(pci_address("0000:00:04.0"), Ok("0000:00:04.0".into()));
        assert_eq!(pci_address("00:03.0"), Ok("0000:00:03.0".into()));
        assert_eq!(pci_address(" 0000:AF:1F.7 "), Ok("0000:af:1f.7".into()));
        for bad in ["", "00:04", "0000:00:20.0", "0000:00:04.8", "0000:0:04.0", "/dev/ng0n1", "zz:00.0"] {
            assert!(pci_address(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn an_absent_device_says_so() {
        let e = check_bound("0000:ff:1f.7").unwrap_err();
        assert!(e.contains("no PCI device 0000:ff:1f.7"), "{e}");
    }
}
