//! Device discovery, opening, and protection domains.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::protection_domain::ProtectionDomain as SwPd;

use super::error::{RdmaError, Result};

/// Shared object of the verbs library, loaded by `rdma-mummy-sys` at start-up.
pub const LIBIBVERBS: &str = "libibverbs.so.1";
/// Shared object of the connection manager library.
pub const LIBRDMACM: &str = "librdmacm.so.1";

/// Whether the process has `library` loaded (or can load it).
///
/// `rdma-mummy-sys` `dlopen`s the rdma-core libraries in a constructor and
/// turns every call into `EOPNOTSUPP` when that failed; this tells the two
/// cases ("no rdma-core" versus "no device") apart so the error can name
/// what is missing.
fn library_loadable(library: &'static CStr) -> bool {
    // SAFETY: `library` is a NUL-terminated C string that outlives the call.
    // RTLD_NOLOAD only looks the library up among already-loaded objects
    // (running no constructors); a non-null handle is released right below.
    let handle = unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    let handle = if handle.is_null() {
        // Not loaded yet (e.g. the constructor has not run in this binary):
        // try a real load, which runs no code of ours.
        // SAFETY: as above; loading rdma-core's libraries runs only their
        // own initialisers, which is what rdma-mummy-sys does anyway.
        unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }
    } else {
        handle
    };
    if handle.is_null() {
        return false;
    }
    // SAFETY: `handle` came from a successful dlopen above and is closed once;
    // this only drops the reference count we took.
    unsafe { libc::dlclose(handle) };
    true
}

/// Fails with [`RdmaError::LibraryMissing`] unless libibverbs and librdmacm load.
pub fn check_libraries() -> Result<()> {
    if !library_loadable(c"libibverbs.so.1") {
        return Err(RdmaError::LibraryMissing {
            library: LIBIBVERBS,
        });
    }
    if !library_loadable(c"librdmacm.so.1") {
        return Err(RdmaError::LibraryMissing { library: LIBRDMACM });
    }
    Ok(())
}

/// What [`list_devices`] reports about one RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Kernel name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// Node GUID, formatted as rdma-core prints it.
    pub guid: String,
    /// Transport (`InfiniBand` also for RoCE, `iWARP`, ...).
    pub transport: String,
}

/// Lists the RDMA devices of this machine.
///
/// # Errors
/// [`RdmaError::LibraryMissing`] when rdma-core is not installed,
/// [`RdmaError::NoDevice`] when it is but the kernel reports no device. Both
/// satisfy [`RdmaError::is_unavailable`]. Never panics for lack of RDMA.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    check_libraries()?;
    let list = device_list()?;
    let out: Vec<DeviceInfo> = list
        .iter()
        .map(|d| DeviceInfo {
            name: d.name(),
            guid: d.guid().to_string(),
            transport: d.transport_type().to_string(),
        })
        .collect();
    if out.is_empty() {
        return Err(RdmaError::NoDevice);
    }
    Ok(out)
}

fn device_list() -> Result<DeviceList> {
    match DeviceList::new() {
        Ok(l) => Ok(l),
        Err(e) => {
            // ENOSYS: no uverbs ABI in the kernel; ENOENT/ENODEV: no sysfs class.
            let os = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<io::Error>())
                .and_then(io::Error::raw_os_error);
            match os {
                Some(libc::ENOSYS | libc::ENOENT | libc::ENODEV) | None => Err(RdmaError::NoDevice),
                Some(libc::EOPNOTSUPP) => Err(RdmaError::LibraryMissing {
                    library: LIBIBVERBS,
                }),
                Some(code) => Err(RdmaError::verbs(
                    "ibv_get_device_list",
                    io::Error::from_raw_os_error(code),
                )),
            }
        }
    }
}

/// An opened RDMA device (a verbs context).
///
/// Most users never open devices by name: [`super::RdmaListener`] and
/// [`super::RdmaConnection`] let rdma_cm pick the device that owns an IP
/// address. This is for listing, diagnostics and tests.
#[derive(Clone)]
pub struct Device {
    ctx: Arc<DeviceContext>,
    name: String,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).finish()
    }
}

impl Device {
    /// Opens the device called `name`, or the first device when `None`.
    ///
    /// # Errors
    /// As [`list_devices`], plus [`RdmaError::DeviceNotFound`].
    pub fn open(name: Option<&str>) -> Result<Device> {
        check_libraries()?;
        let list = device_list()?;
        if list.is_empty() {
            return Err(RdmaError::NoDevice);
        }
        let dev = match name {
            None => list.get(0),
            Some(n) => list.iter().find(|d| d.name() == n),
        };
        let Some(dev) = dev else {
            return Err(RdmaError::DeviceNotFound {
                name: name.unwrap_or_default().to_owned(),
                available: list.iter().map(|d| d.name()).collect(),
            });
        };
        let dev_name = dev.name();
        let ctx = dev
            .open()
            .map_err(|e| RdmaError::verbs("ibv_open_device", io_source(&e)))?;
        Ok(Device {
            ctx,
            name: dev_name,
        })
    }

    /// Kernel name of the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The protection domain of this device context (one per context; see
    /// [`ProtectionDomain`]).
    pub fn protection_domain(&self) -> Result<ProtectionDomain> {
        ProtectionDomain::for_context(&self.ctx, self.name.clone())
    }
}

/// A protection domain: memory regions registered in it can be used by every
/// queue pair of the same device context.
///
/// Ferry keeps **one protection domain per device context** (a process-wide
/// cache), so a guest region registered once per device serves every
/// connection on that device, as the design asks. The domain lives as long as
/// any clone, memory region or queue pair of it.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) pd: Arc<SwPd>,
    device: Arc<str>,
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.device)
            .finish()
    }
}

type PdCache = Mutex<HashMap<usize, Weak<SwPd>>>;
fn pd_cache() -> &'static PdCache {
    static CACHE: OnceLock<PdCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

impl ProtectionDomain {
    pub(crate) fn for_context(
        ctx: &Arc<DeviceContext>,
        device: String,
    ) -> Result<ProtectionDomain> {
        // Keyed by the context's address: while a Weak upgrades, the PD holds
        // an Arc of that context, so the address cannot have been reused.
        let key = Arc::as_ptr(ctx) as usize;
        let mut cache = pd_cache().lock().unwrap_or_else(|p| p.into_inner());
        let pd = match cache.get(&key).and_then(Weak::upgrade) {
            Some(pd) => pd,
            None => {
                let pd = ctx
                    .alloc_pd()
                    .map_err(|e| RdmaError::verbs("ibv_alloc_pd", io_source(&e)))?;
                cache.insert(key, Arc::downgrade(&pd));
                pd
            }
        };
        Ok(ProtectionDomain {
            pd,
            device: device.into(),
        })
    }

    /// Name of the device this domain belongs to.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    pub(crate) fn same_as(&self, other: &Arc<SwPd>) -> bool {
        Arc::ptr_eq(&self.pd, other)
    }
}

/// Recovers the `io::Error` behind one of sideway's error wrappers.
///
/// sideway wraps errno values as `Outer(#[from] Kind)` with
/// `#[error(transparent)] Kind::Ibverbs(io::Error)`; a transparent variant
/// forwards `Display` but does not expose the `io::Error` as a `source`, so
/// after walking the chain we fall back to the `(os error N)` suffix that
/// `io::Error`'s `Display` always prints.
pub(crate) fn io_source(e: &(dyn std::error::Error + 'static)) -> io::Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut last = e;
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return match io.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(io.kind(), io.to_string()),
            };
        }
        last = err;
        cur = err.source();
    }
    let text = last.to_string();
    if let Some(code) = parse_os_error(&text) {
        return io::Error::from_raw_os_error(code);
    }
    io::Error::other(text)
}

fn parse_os_error(text: &str) -> Option<i32> {
    let start = text.rfind("(os error ")? + "(os error ".len();
    let rest = &text[start..];
    rest[..rest.find(')')?].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_error_suffix_is_recovered() {
        let e = io::Error::from_raw_os_error(libc::ENOMEM);
        assert_eq!(parse_os_error(&e.to_string()), Some(libc::ENOMEM));
        assert_eq!(parse_os_error("no code here"), None);
        #[derive(Debug)]
        struct Opaque(String);
        impl std::fmt::Display for Opaque {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for Opaque {}
        let wrapped = Opaque(io::Error::from_raw_os_error(libc::EAGAIN).to_string());
        assert_eq!(io_source(&wrapped).raw_os_error(), Some(libc::EAGAIN));
    }
}
