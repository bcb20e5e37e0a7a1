//! Block jobs through `virt::sys` (with `events.rs`, the crate's only unsafe code).
//!
//! `virt` 0.5 wraps neither `virDomainBlockCommit` nor
//! `virDomainGetBlockJobInfo` nor `virDomainBlockJobAbort`, which releasing
//! a freeze needs (active commit of the overlay into the frozen image, then
//! pivot). [`block_job`] is one small function around those three calls;
//! everything above it is safe code.

use std::ffi::CString;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// One block-job call on one disk.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BlockJobOp<'a> {
    /// `virDomainBlockCommit(dom, disk, base, NULL, 0, ACTIVE | DELETE)`:
    /// starts committing the active layer into `base` (a path in the
    /// disk's backing chain); libvirt deletes the overlay after the pivot.
    CommitActive {
        /// The image to commit into.
        base: &'a str,
    },
    /// `virDomainGetBlockJobInfo`: the job's progress, `None` without a job.
    Info,
    /// `virDomainBlockJobAbort(dom, disk, PIVOT)`: switches the disk to the
    /// commit's base once the job is ready; synchronous.
    Pivot,
}

/// Progress of a block job, in libvirt's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockJobProgress {
    /// Done so far.
    pub(crate) cur: u64,
    /// Total; libvirt reports `cur == end` only once a commit is ready to pivot.
    pub(crate) end: u64,
}

impl BlockJobProgress {
    /// Ready to pivot.
    pub(crate) fn ready(self) -> bool {
        self.end > 0 && self.cur == self.end
    }
}

/// Runs one block-job call on `disk` (a target such as `vda`) of `dom`.
///
/// # Safety argument
///
/// - `dom.as_ptr()` is a valid `virDomainPtr` for the whole call: `dom` is
///   borrowed, so the `Domain` (which owns one reference) outlives the call.
/// - The C strings are `CString`s that live until the end of the function,
///   NUL-terminated, without interior NUL (checked by `CString::new`).
/// - `info` is a zero-initialised plain C struct owned by this frame; libvirt
///   only writes it.
/// - On a negative return libvirt has set the thread-local last error, which
///   `Error::last_error` reads on this same thread.
#[allow(unsafe_code)]
pub(crate) fn block_job(
    dom: &Domain,
    disk: &str,
    op: BlockJobOp<'_>,
) -> Result<Option<BlockJobProgress>, Error> {
    let disk = CString::new(disk)?;
    // SAFETY: see the function's safety argument.
    let ptr = unsafe { dom.as_ptr() };
    match op {
        BlockJobOp::CommitActive { base } => {
            let base = CString::new(base)?;
            let flags = sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | sys::VIR_DOMAIN_BLOCK_COMMIT_DELETE;
            // SAFETY: valid domain pointer and C strings; top = NULL means
            // the active layer, bandwidth 0 means unlimited.
            let ret = unsafe {
                sys::virDomainBlockCommit(
                    ptr,
                    disk.as_ptr(),
                    base.as_ptr(),
                    std::ptr::null(),
                    0,
                    flags,
                )
            };
            if ret < 0 {
                return Err(Error::last_error());
            }
            Ok(None)
        }
        BlockJobOp::Info => {
            let mut info = sys::virDomainBlockJobInfo {
                type_: 0,
                bandwidth: 0,
                cur: 0,
                end: 0,
            };
            // SAFETY: valid domain pointer and C string; `info` is a live,
            // writable struct of the type libvirt expects.
            let ret = unsafe { sys::virDomainGetBlockJobInfo(ptr, disk.as_ptr(), &mut info, 0) };
            match ret {
                r if r < 0 => Err(Error::last_error()),
                0 => Ok(None),
                _ => Ok(Some(BlockJobProgress {
                    cur: info.cur,
                    end: info.end,
                })),
            }
        }
        BlockJobOp::Pivot => {
            // SAFETY: valid domain pointer and C string.
            let ret = unsafe {
                sys::virDomainBlockJobAbort(
                    ptr,
                    disk.as_ptr(),
                    sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT,
                )
            };
            if ret < 0 {
                return Err(Error::last_error());
            }
            Ok(None)
        }
    }
}
