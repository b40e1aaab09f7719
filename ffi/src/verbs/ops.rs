//! verbs.h's `static inline` data-path functions, which have no symbol in `libibverbs.so.1`:
//! `ibv_post_send`, `ibv_post_recv` and `ibv_poll_cq` call the provider's function pointers in
//! `qp->context->ops` / `cq->context->ops`, and so do these. Also the work requests and the
//! reading of completions, tested here against a fake provider (a context whose `ops` are Rust
//! functions), since no RDMA device is needed for that.

use std::ffi::c_int;

use super::{check, QpInfo, VerbsError, WorkCompletion, WriteWithImm};
use crate::sys::verbs as sys;

/// verbs.h's `ibv_post_send`: `qp->context->ops.post_send(qp, wr, &bad_wr)`.
///
/// # Safety
/// `qp` is a live queue pair of an open context; `wr` is a well-formed request list whose
/// scatter entries name registered memory that stays registered until the requests complete.
pub(crate) unsafe fn post_send(
    qp: *mut sys::ibv_qp,
    wr: &mut sys::ibv_send_wr,
) -> Result<(), VerbsError> {
    // SAFETY: `qp` is live (the caller's contract), so its `context` is the open device context,
    // whose `ops` table the provider filled at open and never changes.
    let post_send = unsafe { (*(*qp).context).ops.post_send }
        .ok_or(VerbsError::Unsupported("ibv_post_send"))?;
    let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
    // SAFETY: exactly what the inline function does, with the caller's valid request.
    check("ibv_post_send", unsafe { post_send(qp, wr, &mut bad) })
}

/// verbs.h's `ibv_post_recv`: `qp->context->ops.post_recv(qp, wr, &bad_wr)`.
///
/// # Safety
/// As for [`post_send`], for a receive request list.
pub(crate) unsafe fn post_recv(
    qp: *mut sys::ibv_qp,
    wr: &mut sys::ibv_recv_wr,
) -> Result<(), VerbsError> {
    // SAFETY: as in `post_send`.
    let post_recv = unsafe { (*(*qp).context).ops.post_recv }
        .ok_or(VerbsError::Unsupported("ibv_post_recv"))?;
    let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
    // SAFETY: exactly what the inline function does, with the caller's valid request.
    check("ibv_post_recv", unsafe { post_recv(qp, wr, &mut bad) })
}

/// verbs.h's `ibv_poll_cq`: `cq->context->ops.poll_cq(cq, wcs.len(), wcs)`; returns how many
/// entries of `wcs` were filled.
///
/// # Safety
/// `cq` is a live completion queue of an open context.
pub(crate) unsafe fn poll_cq(
    cq: *mut sys::ibv_cq,
    wcs: &mut [sys::ibv_wc],
) -> Result<usize, VerbsError> {
    // SAFETY: as in `post_send`, for the queue's context.
    let poll_cq =
        unsafe { (*(*cq).context).ops.poll_cq }.ok_or(VerbsError::Unsupported("ibv_poll_cq"))?;
    let room = c_int::try_from(wcs.len()).unwrap_or(c_int::MAX);
    // SAFETY: the provider writes at most `room` entries into `wcs`, which has that many.
    let n = unsafe { poll_cq(cq, room, wcs.as_mut_ptr()) };
    if n < 0 {
        return Err(VerbsError::Call {
            call: "ibv_poll_cq",
            errno: -n,
            message: std::io::Error::from_raw_os_error(-n).to_string(),
        });
    }
    Ok(usize::try_from(n).unwrap_or(0).min(wcs.len()))
}

/// The completions of one poll; the first with an error status becomes
/// [`VerbsError::WorkCompletion`] with `status_str`'s text.
pub(crate) fn completions(
    wcs: &[sys::ibv_wc],
    status_str: impl Fn(u32) -> String,
) -> Result<Vec<WorkCompletion>, VerbsError> {
    wcs.iter()
        .map(|wc| {
            if wc.status != sys::IBV_WC_SUCCESS {
                return Err(VerbsError::WorkCompletion {
                    wr_id: wc.wr_id,
                    status: wc.status,
                    message: status_str(wc.status),
                    vendor_err: wc.vendor_err,
                });
            }
            let imm_data = (wc.wc_flags & sys::IBV_WC_WITH_IMM != 0)
                // SAFETY: with IBV_WC_WITH_IMM set the union holds the immediate (network order);
                // both members are plain u32s.
                .then(|| u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data }));
            Ok(WorkCompletion {
                wr_id: wc.wr_id,
                opcode: wc.opcode,
                byte_len: wc.byte_len,
                imm_data,
                qp_num: wc.qp_num,
            })
        })
        .collect()
}

/// The send request of an RDMA write with immediate, its one scatter entry in `sge` (which must
/// stay where it is until the request is posted): `length` bytes at `local_addr` (key `lkey`) to
/// the peer's buffer at `write.remote_offset`, the immediate in network order, signalled.
pub(crate) fn write_with_imm_request(
    write: &WriteWithImm,
    length: u32,
    local_addr: u64,
    lkey: u32,
    remote: &QpInfo,
    sge: &mut sys::ibv_sge,
) -> sys::ibv_send_wr {
    *sge = sys::ibv_sge {
        addr: local_addr + write.local_offset as u64,
        length,
        lkey,
    };
    let mut wr = sys::ibv_send_wr {
        wr_id: write.wr_id,
        next: std::ptr::null_mut(),
        sg_list: sge,
        num_sge: 1,
        opcode: sys::IBV_WR_RDMA_WRITE_WITH_IMM,
        send_flags: sys::IBV_SEND_SIGNALED,
        ..Default::default()
    };
    wr.__bindgen_anon_1.imm_data = write.imm.to_be();
    wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
        remote_addr: remote.addr + write.remote_offset,
        rkey: remote.rkey,
    };
    wr
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::verbs::{Gid, Mtu};

    /// What the fake provider saw of a posted send: wr_id, opcode, flags, raw immediate,
    /// remote address, rkey, and the scatter entries.
    type SeenSend = (u64, u32, u32, u32, u64, u32, Vec<(u64, u32, u32)>);

    thread_local! {
        static SENDS: RefCell<Vec<SeenSend>> = const { RefCell::new(Vec::new()) };
        static RECVS: RefCell<Vec<(u64, i32)>> = const { RefCell::new(Vec::new()) };
    }

    unsafe extern "C" fn fake_post_send(
        _qp: *mut sys::ibv_qp,
        wr: *mut sys::ibv_send_wr,
        bad: *mut *mut sys::ibv_send_wr,
    ) -> c_int {
        // SAFETY: called by `post_send` below with a valid request whose sg_list has num_sge
        // entries; the union members read are the ones an RDMA write with immediate sets.
        unsafe {
            let w = &*wr;
            let sges = (0..w.num_sge as usize)
                .map(|i| {
                    let s = &*w.sg_list.add(i);
                    (s.addr, s.length, s.lkey)
                })
                .collect();
            let seen = (
                w.wr_id,
                w.opcode,
                w.send_flags,
                w.__bindgen_anon_1.imm_data,
                w.wr.rdma.remote_addr,
                w.wr.rdma.rkey,
                sges,
            );
            SENDS.with(|s| s.borrow_mut().push(seen));
            if w.wr_id == 99 {
                *bad = wr;
                return 12; // ENOMEM, as a full send queue answers
            }
        }
        0
    }

    unsafe extern "C" fn fake_post_recv(
        _qp: *mut sys::ibv_qp,
        wr: *mut sys::ibv_recv_wr,
        _bad: *mut *mut sys::ibv_recv_wr,
    ) -> c_int {
        // SAFETY: called by `post_recv` below with a valid request.
        let w = unsafe { &*wr };
        RECVS.with(|r| r.borrow_mut().push((w.wr_id, w.num_sge)));
        0
    }

    unsafe extern "C" fn fake_poll_cq(
        _cq: *mut sys::ibv_cq,
        room: c_int,
        wc: *mut sys::ibv_wc,
    ) -> c_int {
        assert!(room >= 2, "room for two completions");
        let recv = sys::ibv_wc {
            wr_id: 2,
            status: sys::IBV_WC_SUCCESS,
            opcode: sys::IBV_WC_RECV_RDMA_WITH_IMM,
            wc_flags: sys::IBV_WC_WITH_IMM,
            qp_num: 7,
            __bindgen_anon_1: sys::ibv_wc__bindgen_ty_1 {
                imm_data: 0x1234_5678u32.to_be(),
            },
            ..Default::default()
        };
        let send = sys::ibv_wc {
            wr_id: 1,
            opcode: sys::IBV_WC_RDMA_WRITE,
            qp_num: 7,
            ..Default::default()
        };
        // SAFETY: `poll_cq` passes room for `room` >= 2 entries.
        unsafe {
            *wc = send;
            *wc.add(1) = recv;
        }
        2
    }

    /// A context whose ops are the fakes above, and a queue pair and a completion queue in it.
    struct Fake {
        /// Owned here so that the pointers in `qp` and `cq` stay valid.
        _ctx: Box<sys::ibv_context>,
        qp: Box<sys::ibv_qp>,
        cq: Box<sys::ibv_cq>,
    }

    fn fake(with_ops: bool) -> Fake {
        let mut ctx = Box::new(sys::ibv_context::default());
        if with_ops {
            ctx.ops.post_send = Some(fake_post_send);
            ctx.ops.post_recv = Some(fake_post_recv);
            ctx.ops.poll_cq = Some(fake_poll_cq);
        }
        let ctx_ptr: *mut sys::ibv_context = &mut *ctx;
        let qp = Box::new(sys::ibv_qp {
            context: ctx_ptr,
            qp_num: 7,
            ..Default::default()
        });
        let cq = Box::new(sys::ibv_cq {
            context: ctx_ptr,
            ..Default::default()
        });
        Fake { _ctx: ctx, qp, cq }
    }

    fn remote() -> QpInfo {
        QpInfo {
            port: 1,
            lid: 0,
            gid: Gid::default(),
            gid_index: 0,
            mtu: Mtu::B1024,
            qpn: 7,
            psn: 0,
            addr: 0x10_0000,
            len: 8192,
            rkey: 0xabcd,
        }
    }

    #[test]
    fn a_write_with_immediate_reaches_the_provider_as_verbs_h_builds_it() {
        let mut f = fake(true);
        let write = WriteWithImm {
            wr_id: 1,
            local_offset: 64,
            len: 4096,
            remote_offset: 4096,
            imm: 0x1234_5678,
        };
        let mut sge = sys::ibv_sge::default();
        let mut wr = write_with_imm_request(&write, 4096, 0x20_0000, 0x55, &remote(), &mut sge);
        // SAFETY: the fake queue pair's context has the fake ops; the request is well formed.
        unsafe { post_send(&mut *f.qp, &mut wr) }.expect("posted");
        let seen = SENDS
            .with(|s| s.borrow_mut().pop())
            .expect("the provider saw the request");
        assert_eq!(
            seen,
            (
                1,
                sys::IBV_WR_RDMA_WRITE_WITH_IMM,
                sys::IBV_SEND_SIGNALED,
                0x1234_5678u32.to_be(),
                0x10_0000 + 4096,
                0xabcd,
                vec![(0x20_0000 + 64, 4096, 0x55)]
            )
        );
    }

    #[test]
    fn a_refused_post_is_an_errno_error() {
        let mut f = fake(true);
        let write = WriteWithImm {
            wr_id: 99,
            local_offset: 0,
            len: 8,
            remote_offset: 0,
            imm: 0,
        };
        let mut sge = sys::ibv_sge::default();
        let mut wr = write_with_imm_request(&write, 8, 0x1000, 1, &remote(), &mut sge);
        // SAFETY: as above.
        let err = unsafe { post_send(&mut *f.qp, &mut wr) }.expect_err("ENOMEM");
        assert!(
            matches!(
                err,
                VerbsError::Call {
                    call: "ibv_post_send",
                    errno: 12,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("Cannot allocate memory"), "{err}");
    }

    #[test]
    fn receives_and_polls_go_through_the_ops_table() {
        let mut f = fake(true);
        let mut rwr = sys::ibv_recv_wr {
            wr_id: 2,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
        };
        // SAFETY: as above.
        unsafe { post_recv(&mut *f.qp, &mut rwr) }.expect("posted");
        assert_eq!(RECVS.with(|r| r.borrow_mut().pop()), Some((2, 0)));
        let mut wcs = [sys::ibv_wc::default(); 4];
        // SAFETY: the fake completion queue's context has the fake ops.
        let n = unsafe { poll_cq(&mut *f.cq, &mut wcs) }.expect("polled");
        let got = completions(&wcs[..n], |s| format!("status {s}")).expect("both succeeded");
        assert_eq!(
            got,
            vec![
                WorkCompletion {
                    wr_id: 1,
                    opcode: WorkCompletion::OPCODE_RDMA_WRITE,
                    byte_len: 0,
                    imm_data: None,
                    qp_num: 7
                },
                WorkCompletion {
                    wr_id: 2,
                    opcode: WorkCompletion::OPCODE_RECV_RDMA_WITH_IMM,
                    byte_len: 0,
                    imm_data: Some(0x1234_5678),
                    qp_num: 7
                },
            ]
        );
    }

    #[test]
    fn a_provider_without_the_op_is_unsupported_not_a_crash() {
        let mut f = fake(false);
        let mut wcs = [sys::ibv_wc::default(); 1];
        // SAFETY: the context is valid; its ops are all None.
        let err = unsafe { poll_cq(&mut *f.cq, &mut wcs) }.expect_err("no poll_cq");
        assert!(
            matches!(err, VerbsError::Unsupported("ibv_poll_cq")),
            "{err:?}"
        );
        let mut rwr = sys::ibv_recv_wr::default();
        // SAFETY: as above.
        let err = unsafe { post_recv(&mut *f.qp, &mut rwr) }.expect_err("no post_recv");
        assert!(
            matches!(err, VerbsError::Unsupported("ibv_post_recv")),
            "{err:?}"
        );
    }

    #[test]
    fn a_failed_completion_carries_the_status_text() {
        let ok = sys::ibv_wc {
            wr_id: 1,
            ..Default::default()
        };
        let failed = sys::ibv_wc {
            wr_id: 5,
            status: sys::IBV_WC_RETRY_EXC_ERR,
            vendor_err: 0x81,
            ..Default::default()
        };
        let err = completions(&[ok, failed], |_| {
            "transport retry counter exceeded".to_owned()
        })
        .expect_err("failed");
        assert_eq!(
            err.to_string(),
            "work request 5 completed with transport retry counter exceeded (status 12, vendor error 0x81)"
        );
        assert_eq!(completions(&[ok], |_| String::new()).expect("ok").len(), 1);
    }
}
