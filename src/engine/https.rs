//! The boot data plane over TLS (`[http] tls_listen`): the same answers as
//! the plain HTTP listener ([`HttpService::respond`]: scripts, kernels,
//! initrds), for iPXE built with this server's CA embedded (`bootfleet ipxe
//! build --trust`), which then verifies that it talks to this server before
//! it runs a script or a kernel.
//!
//! One thread per connection, with blocking rustls streams: HTTPS is for
//! the scripts and for sites that want every byte authenticated, not the
//! storm path (plain HTTP on io_uring stays that, and the default). The
//! number of connections is bounded by `http.max_connections`, and each
//! read waits at most `http.header_timeout`, so idle or slow clients cannot
//! hold threads for long.
//!
//! The certificate is the operator's (`tls_cert`, `tls_key`), or one
//! bootfleet signs at every start with a CA it keeps in the state directory
//! (`https-ca.crt`, `https-ca.key`, made once), for the names in
//! `tls_names` (default: the listen address, or every IPv4 address of this
//! host). ECDSA P-256: iPXE verifies it, and TLS 1.2 with ECDHE and AES-GCM
//! is what iPXE and rustls share.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tracing::{debug, info, warn};

use crate::config::{HttpConfig, HttpsConfig};
use crate::proto::http::request::{parse, Parsed};
use crate::server::http::{HttpService, Response};
use crate::shutdown::Shutdown;

/// The CA certificate bootfleet signs its own HTTPS certificates with, in
/// the state directory: what `bootfleet ipxe build --trust` embeds.
pub const CA_CERT_FILE: &str = "https-ca.crt";
/// Its key (mode 0600).
pub const CA_KEY_FILE: &str = "https-ca.key";
/// The CA's name, which its certificate and every server certificate it
/// signs carry (a leaf chains to the kept CA certificate by this name and
/// the CA key's identifier).
const CA_NAME: &str = "bootfleet boot server CA";

/// Why HTTPS cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("http.tls_cert {}: not a readable PEM certificate chain: {source}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("http.tls_key {}: not a readable PEM private key: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the HTTPS certificate and key do not fit together: {0}")]
    Mismatch(#[source] rustls::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making the HTTPS certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot listen for HTTPS on {listen}: {source}")]
    Listen {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> HttpsError + '_ {
    move |source| HttpsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The server's TLS settings: the operator's certificate, or one signed
/// by the CA kept in `state_dir` (made there on first use).
pub fn server_config(
    tls: &HttpsConfig,
    state_dir: &Path,
) -> Result<Arc<rustls::ServerConfig>, HttpsError> {
    let (chain, key) = match &tls.cert_and_key {
        Some((cert, key)) => {
            let certificate_error = |source| HttpsError::Certificate {
                path: cert.clone(),
                source,
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(certificate_error)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(certificate_error)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|source| HttpsError::Key {
                path: key.clone(),
                source,
            })?;
            (chain, key)
        }
        None => own_certificate(state_dir, &certificate_names(tls))?,
    };
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(HttpsError::Mismatch)?;
    Ok(Arc::new(config))
}

/// The names bootfleet's own certificate carries: `tls_names`, else the
/// listen address, else (listening on every address) every IPv4 address
/// of this host, with `localhost`.
fn certificate_names(tls: &HttpsConfig) -> Vec<String> {
    if !tls.names.is_empty() {
        return tls.names.clone();
    }
    if !tls.listen.ip().is_unspecified() {
        return vec![tls.listen.ip().to_string()];
    }
    let mut names: Vec<String> = nix::ifaddrs::getifaddrs()
        .map(|addresses| {
            addresses
                .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip().to_string()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    names.push("localhost".to_string());
    names
}

/// The CA's parameters: the same every time, so that the kept key signs
/// leaves that chain to the kept certificate.
fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    params
}

/// The CA kept in `state_dir`, made there (certificate and key, the key
/// readable by this user only) when it is not there yet.
fn kept_ca(state_dir: &Path) -> Result<rcgen::KeyPair, HttpsError> {
    let cert_path = state_dir.join(CA_CERT_FILE);
    let key_path = state_dir.join(CA_KEY_FILE);
    if key_path.exists() && cert_path.exists() {
        let pem = std::fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
        return Ok(rcgen::KeyPair::from_pem(&pem)?);
    }
    // One of the two without the other (a start cut short): both anew.
    for path in [&cert_path, &key_path] {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(path)(e)),
            _ => {}
        }
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params().self_signed(&key)?;
    std::fs::create_dir_all(state_dir).map_err(io_error(state_dir))?;
    crate::durable::write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(io_error(&key_path))?;
    crate::durable::write_new(&cert_path, cert.pem().as_bytes(), 0o644)
        .map_err(io_error(&cert_path))?;
    info!(ca = %cert_path.display(),
        "made a CA for this server's HTTPS certificates; embed it in iPXE with `bootfleet ipxe build --trust`");
    Ok(key)
}

/// A fresh certificate for `names`, signed by the kept CA, with the CA
/// certificate after it in the chain.
fn own_certificate(
    state_dir: &Path,
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), HttpsError> {
    let ca_key = kept_ca(state_dir)?;
    let ca_cert_path = state_dir.join(CA_CERT_FILE);
    let ca_cert =
        CertificateDer::from_pem_file(&ca_cert_path).map_err(|source| HttpsError::Certificate {
            path: ca_cert_path.clone(),
            source,
        })?;
    let issuer = rcgen::Issuer::new(ca_params(), ca_key);
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().map_or("bootfleet", String::as_str),
    );
    params.use_authority_key_identifier_extension = true;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    let key = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|_| HttpsError::Generate(rcgen::Error::CouldNotParseKeyPair))?;
    info!(names = ?names, "HTTPS certificate signed by this server's CA");
    Ok((vec![cert.der().clone(), ca_cert], key))
}

/// Limits each connection keeps to.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    max_head_bytes: usize,
    read_timeout: Duration,
    write_timeout: Duration,
}

/// Starts the HTTPS listener; it stops accepting when `shutdown` is
/// triggered.
pub fn spawn(
    tls: &HttpsConfig,
    http: &HttpConfig,
    config: Arc<rustls::ServerConfig>,
    service: Arc<HttpService>,
    shutdown: Shutdown,
) -> Result<std::thread::JoinHandle<()>, HttpsError> {
    let listen = tls.listen;
    let listener =
        TcpListener::bind(listen).map_err(|source| HttpsError::Listen { listen, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| HttpsError::Listen { listen, source })?;
    let limits = Limits {
        max_connections: http.max_connections,
        max_head_bytes: http.max_header_bytes,
        read_timeout: http
            .header_timeout
            .max(http.idle_timeout.min(Duration::from_secs(60))),
        write_timeout: http.send_timeout,
    };
    info!(%listen, "HTTPS listening: the same scripts and files as HTTP, for iPXE that verifies this server");
    std::thread::Builder::new()
        .name("bootfleet-https".into())
        .spawn(move || accept_loop(listener, config, service, limits, shutdown))
        .map_err(|source| HttpsError::Listen { listen, source })
}

fn accept_loop(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    service: Arc<HttpService>,
    limits: Limits,
    shutdown: Shutdown,
) {
    let open = Arc::new(AtomicUsize::new(0));
    while !shutdown.is_triggered() {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(error) => {
                debug!(%error, "HTTPS accept failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            debug!(%peer, "HTTPS connection refused: http.max_connections open");
            continue;
        }
        let (config, service, open) =
            (Arc::clone(&config), Arc::clone(&service), Arc::clone(&open));
        let spawned = std::thread::Builder::new()
            .name("bootfleet-https-conn".into())
            .spawn(move || {
                if let Err(error) = serve(stream, peer, config, &service, limits) {
                    debug!(%peer, %error, "HTTPS connection ended");
                }
                open.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(error) = spawned {
            warn!(%error, "no thread for an HTTPS connection; it is closed");
        }
    }
}

/// Serves one connection: requests one after another while it is kept
/// alive.
fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    service: &HttpService,
    limits: Limits,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(limits.read_timeout))?;
    stream.set_write_timeout(Some(limits.write_timeout))?;
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
    let connection = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let request = loop {
            match parse(&buffer, limits.max_head_bytes) {
                Parsed::Complete(request, used) => {
                    buffer.drain(..used);
                    break request;
                }
                Parsed::Partial => {
                    let mut chunk = [0u8; 4096];
                    let read = tls.read(&mut chunk)?;
                    if read == 0 {
                        return Ok(());
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                }
                Parsed::Invalid(status, why) => {
                    let response = service.invalid(status, why);
                    write_response(&mut tls, &response)?;
                    return Ok(());
                }
            }
        };
        let started = Instant::now();
        let response = service.respond(&request, local, peer);
        let sent = write_response(&mut tls, &response);
        service.finished(
            &response,
            peer,
            *sent.as_ref().unwrap_or(&0),
            started.elapsed(),
        );
        sent?;
        if !response.keep_alive {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            return Ok(());
        }
    }
}

/// Writes `response` (head, then each body piece); returns the body bytes
/// written.
fn write_response(tls: &mut impl Write, response: &Response) -> std::io::Result<u64> {
    tls.write_all(response.piece_bytes(0))?;
    let mut sent = 0;
    for piece in 1..=response.segments.len() {
        let bytes = response.piece_bytes(piece);
        tls.write_all(bytes)?;
        sent += bytes.len() as u64;
    }
    tls.flush()?;
    Ok(sent)
}

/// An IPv4 client seen through an IPv6 socket as its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
