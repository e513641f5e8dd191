//! [`Link`]: the byte stream under a connection's frames, plain TCP or TCP
//! inside mutual TLS 1.3.
//!
//! This module owns only the choice of stream; the TLS policy (CA, names,
//! revocation) is `orrery-trust`'s and the frames are `frame.rs`'s. It must
//! never read or interpret bytes itself.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One connection's transport.
#[derive(Debug)]
pub enum Link {
    /// Plain TCP (only when the node runs with `tls.enabled = false`).
    Plain(TcpStream),
    /// TCP inside TLS 1.3 with both sides' certificates verified.
    Tls(Box<orrery_trust::tokio_rustls::TlsStream<TcpStream>>),
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_flush(cx),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Link::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Resolves once the peer's certificate is revoked, with the reason; never
/// on a plain connection. Connections select on it so that a revocation
/// the cluster decides closes them, not only future handshakes.
pub(crate) async fn until_revoked(
    trust: Option<&orrery_trust::TrustConfig>,
    cert: Option<&orrery_trust::PeerIdentity>,
) -> orrery_trust::Revoked {
    let (Some(trust), Some(cert)) = (trust, cert) else {
        return std::future::pending().await;
    };
    let mut list = trust.revocations().subscribe();
    loop {
        if let Err(why) = list.borrow_and_update().check(cert) {
            return why;
        }
        if list.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Whether an I/O error on a TLS link is TLS refusing the bytes it read (a
/// record that does not authenticate, a protocol violation), as opposed to
/// the transport failing.
pub(crate) fn is_tls_failure(err: &io::Error) -> bool {
    err.get_ref()
        .is_some_and(|e| e.downcast_ref::<orrery_trust::rustls::Error>().is_some())
}
