//! `bootfleet ipxe build`: iPXE binaries with a script for this server
//! built in, from an iPXE source tree the operator has (this never
//! downloads anything).
//!
//! The binaries are the write-up's methods 2 and 4: a NIC option ROM
//! (`1af41000.rom` for virtio-net, or any `VVVVDDDD.rom`) that an operator
//! flashes, and `undionly.kpxe` / `snponly.efi` / `ipxe.efi` that PXE
//! firmware chainloads. Each carries [`crate::boot::script::embedded_script`],
//! so the machine fetches its own script by MAC address without a boot
//! file from DHCP. The tree gets the multicast TFTP fix when it lacks it
//! (every upstream iPXE drops multicast data without it: the group's
//! socket address is never zeroed and `udp_demux()` compares its padding),
//! so these binaries can boot by `tftm://` too.
//!
//! With `--trust CA.pem` the binaries trust only that CA (iPXE's `TRUST=`)
//! and can fetch over HTTPS (BIOS builds get `DOWNLOAD_PROTO_HTTPS` in the
//! tree's `config/local/general.h`; UEFI builds have it already): pointed
//! at `https://` servers, they verify that it is this server before they
//! run its script or kernel.
//!
//! iPXE's own `make` does the building; what is here is choosing the
//! targets, the fix, the script and collecting the results with their
//! SHA-256 into the output directory, which the HTTP and TFTP services
//! serve and the panel's Images page lists ([`list_builds`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// What `bootfleet ipxe build` builds when no target is named: the BIOS
/// chainload loader, the UEFI loaders (full drivers, and the one that
/// uses the firmware's network stack), and the virtio-net ROM.
pub const DEFAULT_TARGETS: [&str; 4] = ["undionly.kpxe", "ipxe.efi", "snponly.efi", "1af41000.rom"];

/// The file the embedded script is kept in beside the binaries.
pub const SCRIPT_NAME: &str = "bootfleet.ipxe";

/// The line the fix adds in `tftp_process_multicast()`, and the one it
/// goes before.
const FIX_LINE: &str = "memset ( &socket, 0, sizeof ( socket ) );";
const FIX_ANCHOR: &str = "socket.sin.sin_family = AF_INET;";

/// One build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The iPXE tree: its top directory or its `src`.
    pub source: PathBuf,
    /// Where the binaries, the script and `SHA256SUMS` go.
    pub out: PathBuf,
    /// Server base URLs the script tries in turn (`http://ADDRESS[:PORT]`,
    /// `${next-server}` allowed).
    pub servers: Vec<String>,
    /// Targets: `undionly.kpxe`, `ipxe.efi`, `VVVVDDDD.rom`, …, or a path
    /// under `src` such as `bin-arm64-efi/snponly.efi`.
    pub targets: Vec<String>,
    /// `make -j`.
    pub jobs: usize,
    /// Apply the multicast TFTP fix to the tree when it lacks it.
    pub multicast_fix: bool,
    /// PEM CA certificates the binaries trust for HTTPS (iPXE's `TRUST=`);
    /// empty: iPXE's own defaults, and BIOS builds without HTTPS.
    pub trust: Vec<PathBuf>,
}

/// What a build made.
#[derive(Debug, Clone)]
pub struct Built {
    pub fix: FixState,
    /// Each binary's file name in the output directory and its SHA-256.
    pub files: Vec<(String, String)>,
    pub script: String,
}

/// The multicast fix in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixState {
    /// The tree had it (an earlier build, or an iPXE that fixed it).
    AlreadyThere,
    /// This build added it.
    Applied,
    /// Not asked for: the binaries drop multicast TFTP data.
    NotApplied,
}

/// Why a build did not finish.
#[derive(Debug, thiserror::Error)]
pub enum IpxeBuildError {
    #[error(
        "{0} is not an iPXE source tree (no src/Makefile and src/net/udp/tftp.c): \
         pass the directory `git clone https://github.com/ipxe/ipxe` made"
    )]
    NotATree(PathBuf),
    #[error(
        "{0} has no tftp_process_multicast() with the line the multicast fix goes before; \
         apply tests/ipxe/0001-tftp-zero-multicast-socket-address.patch by hand, or build \
         with --no-multicast-fix"
    )]
    FixDoesNotApply(PathBuf),
    #[error(transparent)]
    Script(#[from] crate::boot::script::EmbeddedScriptError),
    #[error(
        "{0:?} is not a target this builds: name a file such as undionly.kpxe, ipxe.efi, \
         snponly.efi, 1af41000.rom, or a path under src such as bin-arm64-efi/snponly.efi"
    )]
    BadTarget(String),
    #[error("could not run make (install gcc, make, binutils, perl, liblzma-dev and mtools): {0}")]
    NoMake(std::io::Error),
    #[error("iPXE's make failed ({0}); its output is above")]
    MakeFailed(std::process::ExitStatus),
    #[error(
        "{0} is not a PEM certificate (-----BEGIN CERTIFICATE-----): pass the CA certificate \
         the server's HTTPS certificate is signed by (bootfleet's own: https-ca.crt in its state directory)"
    )]
    NotACertificate(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IpxeBuildError + '_ {
    move |source| IpxeBuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The tree's `src` directory.
pub fn source_dir(tree: &Path) -> Result<PathBuf, IpxeBuildError> {
    for candidate in [tree.join("src"), tree.to_path_buf()] {
        if candidate.join("Makefile").is_file() && candidate.join("net/udp/tftp.c").is_file() {
            return Ok(candidate);
        }
    }
    Err(IpxeBuildError::NotATree(tree.to_path_buf()))
}

/// The make target for a name: `*.efi` is an x86_64 UEFI binary, anything
/// else without a slash a BIOS one (`bin/`); a name with a slash is taken
/// as it is.
pub fn make_target(name: &str) -> Result<String, IpxeBuildError> {
    let safe = !name.is_empty()
        && !name.starts_with('/')
        && !name.split('/').any(|part| part.is_empty() || part == "..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    let known_kind = [
        ".kpxe", ".kkpxe", ".pxe", ".efi", ".rom", ".lkrn", ".usb", ".iso",
    ]
    .iter()
    .any(|ext| name.ends_with(ext));
    if !safe || !known_kind {
        return Err(IpxeBuildError::BadTarget(name.to_string()));
    }
    Ok(if name.contains('/') {
        name.to_string()
    } else if name.ends_with(".efi") {
        format!("bin-x86_64-efi/{name}")
    } else {
        format!("bin/{name}")
    })
}

/// Adds the multicast fix to `src/net/udp/tftp.c` unless it is there.
pub fn apply_multicast_fix(src: &Path) -> Result<FixState, IpxeBuildError> {
    let path = src.join("net/udp/tftp.c");
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let not_applicable = || IpxeBuildError::FixDoesNotApply(path.clone());
    let function = text
        .find("tftp_process_multicast (")
        .ok_or_else(not_applicable)?;
    let anchor = function
        + text[function..]
            .find(FIX_ANCHOR)
            .ok_or_else(not_applicable)?;
    let line_start = text[..anchor].rfind('\n').map_or(0, |i| i + 1);
    let before = text[..line_start].trim_end();
    if before.ends_with(FIX_LINE) {
        return Ok(FixState::AlreadyThere);
    }
    let indent = &text[line_start..anchor];
    let mut fixed = String::with_capacity(text.len() + 64);
    fixed.push_str(&text[..line_start]);
    fixed.push_str(indent);
    fixed.push_str(FIX_LINE);
    fixed.push('\n');
    fixed.push_str(&text[line_start..]);
    write_replacing(&path, fixed.as_bytes())?;
    Ok(FixState::Applied)
}

/// The absolute paths of `certificates` (iPXE's make runs in `src`), each
/// checked to be a PEM certificate.
fn trusted_certificates(certificates: &[PathBuf]) -> Result<Vec<String>, IpxeBuildError> {
    certificates
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(io_error(path))?;
            if !String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----") {
                return Err(IpxeBuildError::NotACertificate(path.clone()));
            }
            let absolute = path.canonicalize().map_err(io_error(path))?;
            Ok(absolute.display().to_string())
        })
        .collect()
}

/// The line that turns HTTPS on for BIOS builds (iPXE leaves it off there
/// by default), in the tree's local configuration.
const HTTPS_LINE: &str = "#define DOWNLOAD_PROTO_HTTPS";

/// Adds [`HTTPS_LINE`] to `src/config/local/general.h` unless it is there.
fn enable_https_for_bios(src: &Path) -> Result<(), IpxeBuildError> {
    let path = src.join("config/local/general.h");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_error(&path)(e)),
    };
    if text.lines().any(|line| line.trim() == HTTPS_LINE) {
        return Ok(());
    }
    let mut enabled = text;
    if !enabled.is_empty() && !enabled.ends_with('\n') {
        enabled.push('\n');
    }
    enabled.push_str("/* bootfleet ipxe build --trust: HTTPS in BIOS builds too */\n");
    enabled.push_str(HTTPS_LINE);
    enabled.push('\n');
    write_replacing(&path, enabled.as_bytes())
}

/// Writes `path` whole or not at all.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), IpxeBuildError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.bootfleet-new"));
    let mut file = std::fs::File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(bytes).map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io_error(path))
}

/// Builds the binaries `request` names with the script built in, into
/// `request.out`. iPXE's `make` writes its progress to this process's
/// standard error.
pub fn build(request: &BuildRequest) -> Result<Built, IpxeBuildError> {
    let src = source_dir(&request.source)?;
    let script = crate::boot::script::embedded_script(&request.servers)?;
    let targets = request
        .targets
        .iter()
        .map(|name| make_target(name))
        .collect::<Result<Vec<_>, _>>()?;
    let fix = if request.multicast_fix {
        apply_multicast_fix(&src)?
    } else {
        FixState::NotApplied
    };
    let trust = trusted_certificates(&request.trust)?;
    if !trust.is_empty() && targets.iter().any(|t| t.starts_with("bin/")) {
        enable_https_for_bios(&src)?;
    }
    std::fs::create_dir_all(&request.out).map_err(io_error(&request.out))?;
    let out = request.out.canonicalize().map_err(io_error(&request.out))?;
    let script_path = out.join(SCRIPT_NAME);
    write_replacing(&script_path, script.as_bytes())?;
    let mut make = Command::new("make");
    if !trust.is_empty() {
        make.arg(format!("TRUST={}", trust.join(",")));
    }
    let status = make
        .current_dir(&src)
        .arg(format!("-j{}", request.jobs.max(1)))
        .args(&targets)
        .arg(format!("EMBED={}", script_path.display()))
        // make's progress goes where this command's messages go; standard
        // output is kept for the list of what was built.
        .stdout(std::io::stderr())
        .status()
        .map_err(IpxeBuildError::NoMake)?;
    if !status.success() {
        return Err(IpxeBuildError::MakeFailed(status));
    }
    let mut files = Vec::new();
    for target in &targets {
        let built = src.join(target);
        let name = built
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&built).map_err(io_error(&built))?;
        write_replacing(&out.join(&name), &bytes)?;
        files.push((name, crate::proto::lower_hex(&Sha256::digest(&bytes))));
    }
    let mut sums: String = files
        .iter()
        .map(|(name, sha)| format!("{sha}  {name}\n"))
        .collect();
    sums.push_str(&format!(
        "{}  {SCRIPT_NAME}\n",
        crate::proto::lower_hex(&Sha256::digest(script.as_bytes()))
    ));
    write_replacing(&out.join("SHA256SUMS"), sums.as_bytes())?;
    Ok(Built { fix, files, script })
}

/// One file of a build, as the panel lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BuiltFile {
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The files of the build in `dir` (from its `SHA256SUMS`), or nothing
/// when there is none.
pub fn list_builds(dir: &Path) -> Vec<BuiltFile> {
    let Ok(sums) = std::fs::read_to_string(dir.join("SHA256SUMS")) else {
        return Vec::new();
    };
    sums.lines()
        .filter_map(|line| {
            let (sha256, name) = line.split_once("  ")?;
            let bytes = std::fs::metadata(dir.join(name)).ok()?.len();
            Some(BuiltFile {
                name: name.to_string(),
                sha256: sha256.to_string(),
                bytes,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_their_platform_directories_and_nothing_else_passes() {
        assert_eq!(make_target("undionly.kpxe").unwrap(), "bin/undionly.kpxe");
        assert_eq!(make_target("1af41000.rom").unwrap(), "bin/1af41000.rom");
        assert_eq!(make_target("ipxe.efi").unwrap(), "bin-x86_64-efi/ipxe.efi");
        assert_eq!(
            make_target("bin-arm64-efi/snponly.efi").unwrap(),
            "bin-arm64-efi/snponly.efi"
        );
        for bad in [
            "",
            "/etc/passwd.rom",
            "../x.efi",
            "bin//x.rom",
            "clean",
            "a b.rom",
            "x.rom;rm",
        ] {
            assert!(make_target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn https_goes_into_the_local_config_once_and_only_certificates_are_trusted() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("config/local")).unwrap();
        let general = src.path().join("config/local/general.h");
        std::fs::write(&general, "#define NET_PROTO_IPV6").unwrap();
        enable_https_for_bios(src.path()).unwrap();
        enable_https_for_bios(src.path()).unwrap();
        let text = std::fs::read_to_string(&general).unwrap();
        assert!(text.starts_with("#define NET_PROTO_IPV6\n"), "{text}");
        assert_eq!(text.matches(HTTPS_LINE).count(), 1, "{text}");
        let not_pem = src.path().join("ca.der");
        std::fs::write(&not_pem, [0x30, 0x82, 0x01]).unwrap();
        assert!(matches!(
            trusted_certificates(&[not_pem]),
            Err(IpxeBuildError::NotACertificate(_))
        ));
        let pem = src.path().join("ca.crt");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let trusted = trusted_certificates(&[pem]).unwrap();
        assert!(
            trusted[0].starts_with('/'),
            "absolute for make in src: {trusted:?}"
        );
    }

    #[test]
    fn the_multicast_fix_goes_in_once_and_only_where_it_belongs() {
        let tree = tempfile::tempdir().unwrap();
        let src = tree.path().join("src");
        std::fs::create_dir_all(src.join("net/udp")).unwrap();
        std::fs::write(src.join("Makefile"), "").unwrap();
        let original = "static int other ( void ) {\n\tsocket.sin.sin_family = AF_INET;\n}\n\
            static int tftp_process_multicast ( struct tftp_request *tftp ) {\n\
            \tif ( *addr && *port ) {\n\
            \t\tsocket.sin.sin_family = AF_INET;\n\
            \t}\n}\n";
        std::fs::write(src.join("net/udp/tftp.c"), original).unwrap();
        assert_eq!(source_dir(tree.path()).unwrap(), src);
        assert_eq!(apply_multicast_fix(&src).unwrap(), FixState::Applied);
        let fixed = std::fs::read_to_string(src.join("net/udp/tftp.c")).unwrap();
        assert_eq!(
            fixed,
            original.replace(
                "\t\tsocket.sin.sin_family",
                "\t\tmemset ( &socket, 0, sizeof ( socket ) );\n\t\tsocket.sin.sin_family"
            )
        );
        assert_eq!(apply_multicast_fix(&src).unwrap(), FixState::AlreadyThere);
        assert_eq!(
            std::fs::read_to_string(src.join("net/udp/tftp.c")).unwrap(),
            fixed
        );
        std::fs::write(src.join("net/udp/tftp.c"), "int main(void) {}\n").unwrap();
        assert!(matches!(
            apply_multicast_fix(&src),
            Err(IpxeBuildError::FixDoesNotApply(_))
        ));
        assert!(matches!(
            source_dir(&src.join("net")),
            Err(IpxeBuildError::NotATree(_))
        ));
    }
}
