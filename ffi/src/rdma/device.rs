//! Device discovery, opening, and protection domains.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use rdma_mummy_sys::ibv_context;
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::protection_domain::ProtectionDomain as SwPd;
use sideway::rdmacm::communication_manager::{EventChannel, PortSpace};

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

    /// A new protection domain on this device.
    pub fn protection_domain(&self) -> Result<ProtectionDomain> {
        ProtectionDomain::alloc(&self.ctx)
    }

    /// The protection domain of `domains` on this device.
    pub fn protection_domain_in(&self, domains: &Domains) -> Result<ProtectionDomain> {
        domains.for_context(&self.ctx)
    }
}

/// A protection domain: memory regions registered in it can be used by the
/// queue pairs of the same domain, and by no others.
///
/// Ferry gives **each migration its own protection domains** ([`Domains`]:
/// one per device the migration uses), so a queue pair of one migration can
/// never address the memory another migration registered, whatever rkey it
/// tries. The domain lives as long as any clone, memory region or queue pair
/// of it.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) pd: Arc<SwPd>,
    pub(crate) ctx: Arc<DeviceContext>,
    device: Arc<str>,
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.device)
            .finish()
    }
}

impl ProtectionDomain {
    /// Allocates a new protection domain on `ctx`.
    pub(crate) fn alloc(ctx: &Arc<DeviceContext>) -> Result<ProtectionDomain> {
        let pd = ctx
            .alloc_pd()
            .map_err(|e| RdmaError::verbs("ibv_alloc_pd", io_source(&e)))?;
        Ok(ProtectionDomain {
            pd,
            ctx: Arc::clone(ctx),
            device: ctx.name().into(),
        })
    }

    /// Name of the device this domain belongs to.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    pub(crate) fn same_as(&self, other: &Arc<SwPd>) -> bool {
        Arc::ptr_eq(&self.pd, other)
    }

    /// Whether this domain and `other` are the same domain.
    pub fn is_same(&self, other: &ProtectionDomain) -> bool {
        self.same_as(&other.pd)
    }

    pub(crate) fn context_addr(&self) -> usize {
        context_addr(&self.ctx)
    }
}

/// The address of a device context's `ibv_context`, to compare contexts.
pub(crate) fn context_addr(ctx: &DeviceContext) -> usize {
    // SAFETY: the pointer is only turned into an integer, never dereferenced.
    unsafe { ctx.context() }.as_ptr() as usize
}

/// The protection domains of **one** migration: one per RDMA device it
/// uses, allocated on first use and released when the last clone, memory
/// region and queue pair of each is gone.
///
/// Everything a migration registers and every queue pair it creates or
/// accepts lives in these domains, and nothing of any other migration does.
#[derive(Clone, Default)]
pub struct Domains {
    inner: Arc<Mutex<Vec<ProtectionDomain>>>,
}

impl std::fmt::Debug for Domains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_list()
            .entries(all.iter().map(|d| d.device_name().to_owned()))
            .finish()
    }
}

impl Domains {
    /// An empty set (no domain allocated yet).
    pub fn new() -> Domains {
        Domains::default()
    }

    /// This migration's domain on the device of `ctx`, allocated on first use.
    pub(crate) fn for_context(&self, ctx: &Arc<DeviceContext>) -> Result<ProtectionDomain> {
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = context_addr(ctx);
        if let Some(pd) = all.iter().find(|d| d.context_addr() == key) {
            return Ok(pd.clone());
        }
        let pd = ProtectionDomain::alloc(ctx)?;
        all.push(pd.clone());
        Ok(pd)
    }

    /// How many protection domains (devices) the set holds.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no domain was allocated yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sideway device context of the verbs context librdmacm bound an id
/// to (`verbs`), found by binding a throw-away sideway id to the same local
/// IP: librdmacm opens each device once per process, and sideway keeps one
/// `DeviceContext` per such context, so the two must be the same.
pub(crate) fn context_for(
    verbs: NonNull<ibv_context>,
    local: IpAddr,
) -> Result<Arc<DeviceContext>> {
    let ch = EventChannel::new()
        .map_err(|e| RdmaError::verbs("rdma_create_event_channel", io_source(&e)))?;
    let id = ch
        .create_id(PortSpace::Tcp)
        .map_err(|e| RdmaError::verbs("rdma_create_id", io_source(&e)))?;
    id.bind_addr(SocketAddr::new(local, 0))
        .map_err(|e| RdmaError::verbs("rdma_bind_addr", io_source(&e)))?;
    let ctx = id.get_device_context().ok_or(RdmaError::NoDevice)?;
    if context_addr(&ctx) != verbs.as_ptr() as usize {
        return Err(RdmaError::verbs(
            "rdma_bind_addr",
            io::Error::other(format!(
                "{local}: librdmacm bound two ids on one address to different device contexts"
            )),
        ));
    }
    Ok(ctx)
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
