//! The part of iPXE's script language that boot scripts use, so that a
//! simulated machine follows a script as iPXE would: settings and their
//! expansion (`${name}`, `${name:uristring}`), `set`, `isset`, `&&` and
//! `||`, `sleep`, `echo`, `chain`, `kernel`/`imgfetch`, `initrd`, `boot`,
//! `exit`. Anything else (a menu, which needs an operator) stops the
//! script with an error that names the command.
//!
//! Interpreting is pure: a script and the machine's settings in, the
//! sleeps and the one thing the script ends with out. Fetching is the
//! caller's.

use std::collections::HashMap;

/// A machine's iPXE settings (`net0/mac`, `uuid`, `platform`, ...).
#[derive(Debug, Clone, Default)]
pub struct Settings(pub HashMap<String, String>);

impl Settings {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .or_else(|| self.0.get(name.strip_prefix("net0/").unwrap_or(name)))
            .map(String::as_str)
    }

    /// `text` with every `${name}` and `${name:type}` expanded; unknown
    /// settings expand to nothing, as in iPXE.
    pub fn expand(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                return out;
            };
            let (name, kind) = match after[..end].split_once(':') {
                Some((name, kind)) => (name, Some(kind)),
                None => (&after[..end], None),
            };
            let value = self.get(name).unwrap_or("");
            match kind {
                Some("uristring") => out.push_str(&uri_escape(value)),
                _ => out.push_str(value),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// iPXE's `uristring` formatting: unreserved characters stay, the rest is
/// percent-encoded.
fn uri_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// How a script ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// `chain URL`: fetch it and follow it.
    Chain(String),
    /// `boot` (or the end of a script that loaded a kernel).
    Boot {
        kernel: String,
        initrds: Vec<String>,
        /// The kernel's command line (the words after its URL).
        cmdline: Vec<String>,
    },
    /// `exit`: boot from the local disk.
    Exit,
}

/// What running a script asks of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Seconds slept before the ending.
    pub sleep_seconds: u64,
    pub ending: Ending,
}

/// Runs `script` with `settings` (which `set` changes).
pub fn run(script: &str, settings: &mut Settings) -> Result<Outcome, String> {
    let mut lines = script.lines();
    match lines.next().map(str::trim) {
        Some(magic) if magic.starts_with("#!ipxe") || magic.starts_with("#!gpxe") => {}
        _ => return Err("not an iPXE script (no #!ipxe line)".into()),
    }
    let mut state = State {
        sleep_seconds: 0,
        kernel: None,
        initrds: Vec::new(),
        cmdline: Vec::new(),
    };
    for line in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(':') {
            continue;
        }
        if let Some(ending) = run_line(line, settings, &mut state)? {
            return Ok(Outcome {
                sleep_seconds: state.sleep_seconds,
                ending,
            });
        }
    }
    match state.kernel {
        Some(kernel) => Ok(Outcome {
            sleep_seconds: state.sleep_seconds,
            ending: Ending::Boot {
                kernel,
                initrds: state.initrds,
                cmdline: state.cmdline,
            },
        }),
        None => Err("script ended without booting anything".into()),
    }
}

struct State {
    sleep_seconds: u64,
    kernel: Option<String>,
    initrds: Vec<String>,
    cmdline: Vec<String>,
}

/// One line: commands joined by `&&` and `||`, left to right as iPXE does.
fn run_line(
    line: &str,
    settings: &mut Settings,
    state: &mut State,
) -> Result<Option<Ending>, String> {
    let mut succeeded = true;
    let mut run_next = true;
    let mut words = line.split_whitespace().peekable();
    loop {
        let mut command = Vec::new();
        let mut joiner = None;
        for word in words.by_ref() {
            if word == "&&" || word == "||" {
                joiner = Some(word);
                break;
            }
            command.push(word);
        }
        if run_next && !command.is_empty() {
            match command_result(&command, settings, state)? {
                Step::Ended(ending) => return Ok(Some(ending)),
                Step::Status(ok) => succeeded = ok,
            }
        }
        match joiner {
            None => return Ok(None),
            Some("&&") => run_next = succeeded,
            Some(_) => {
                run_next = !succeeded;
                if !succeeded {
                    succeeded = true; // `a || b`: b's status decides
                }
            }
        }
    }
}

enum Step {
    Status(bool),
    Ended(Ending),
}

/// The first argument that is not an option (`--name x` takes a value).
fn target<'a>(args: &[&'a str]) -> Option<&'a str> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match *arg {
            "--name" | "-n" | "--timeout" | "-t" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => return Some(a),
        }
    }
    None
}

fn command_result(
    command: &[&str],
    settings: &mut Settings,
    state: &mut State,
) -> Result<Step, String> {
    let expanded: Vec<String> = command.iter().map(|w| settings.expand(w)).collect();
    let args: Vec<&str> = expanded.iter().map(String::as_str).collect();
    Ok(match args[0] {
        "set" => {
            let name = args.get(1).ok_or("set without a name")?;
            settings.0.insert(name.to_string(), args[2..].join(" "));
            Step::Status(true)
        }
        "isset" => Step::Status(args.get(1).is_some_and(|v| !v.is_empty())),
        "echo" | "dhcp" | "ifopen" | "ifconf" | "imgfree" | "prompt" => Step::Status(true),
        "sleep" => {
            state.sleep_seconds += args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            Step::Status(true)
        }
        "chain" => Step::Ended(Ending::Chain(
            target(&args[1..]).ok_or("chain without a URL")?.to_string(),
        )),
        "kernel" | "imgfetch" | "module" if args[0] != "module" || state.kernel.is_none() => {
            let url = target(&args[1..]).ok_or("kernel without a URL")?;
            if args[0] == "kernel" {
                state.cmdline = args
                    .iter()
                    .skip(1)
                    .skip_while(|a| **a != url)
                    .skip(1)
                    .map(|a| a.to_string())
                    .collect();
            }
            state.kernel = Some(url.to_string());
            Step::Status(true)
        }
        "initrd" | "module" => {
            state.initrds.push(
                target(&args[1..])
                    .ok_or("initrd without a URL")?
                    .to_string(),
            );
            Step::Status(true)
        }
        "boot" => match state.kernel.take() {
            Some(kernel) => Step::Ended(Ending::Boot {
                kernel,
                initrds: std::mem::take(&mut state.initrds),
                cmdline: std::mem::take(&mut state.cmdline),
            }),
            None => return Err("boot without a kernel".into()),
        },
        "exit" => Step::Ended(Ending::Exit),
        other => {
            return Err(format!(
                "`{other}` is not simulated (a menu needs an operator)"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let mut s = Settings::default();
        s.0.insert("mac".into(), "52:54:00:00:00:01".into());
        s.0.insert("serial".into(), "SN 1".into());
        s.0.insert("platform".into(), "pcbios".into());
        s
    }

    #[test]
    fn the_chain_script_collects_the_facts_that_are_set() {
        let script = "#!ipxe\n# comment\nset bootfleet-facts from=ipxe\n\
            isset ${uuid} && set bootfleet-facts ${bootfleet-facts}&uuid=${uuid} ||\n\
            isset ${serial:uristring} && set bootfleet-facts ${bootfleet-facts}&serial=${serial:uristring} ||\n\
            chain --autofree http://h/boot/${net0/mac}.ipxe?${bootfleet-facts}\n";
        let outcome = run(script, &mut settings()).unwrap();
        assert_eq!(
            outcome.ending,
            Ending::Chain("http://h/boot/52:54:00:00:00:01.ipxe?from=ipxe&serial=SN%201".into())
        );
    }

    #[test]
    fn kernel_initrds_and_boot() {
        let script = "#!ipxe\nkernel --name k http://h/vmlinuz console=ttyS0\ninitrd http://h/a.img\ninitrd http://h/b.img\nboot\n";
        let outcome = run(script, &mut settings()).unwrap();
        assert_eq!(
            outcome.ending,
            Ending::Boot {
                kernel: "http://h/vmlinuz".into(),
                initrds: vec!["http://h/a.img".into(), "http://h/b.img".into()],
                cmdline: vec!["console=ttyS0".into()],
            }
        );
    }

    #[test]
    fn waiting_exit_and_what_is_not_simulated() {
        let outcome = run(
            "#!ipxe\nsleep 7\nchain --replace http://h/again\n",
            &mut settings(),
        )
        .unwrap();
        assert_eq!(outcome.sleep_seconds, 7);
        assert_eq!(outcome.ending, Ending::Chain("http://h/again".into()));
        assert_eq!(
            run("#!gpxe\nexit\n", &mut settings()).unwrap().ending,
            Ending::Exit
        );
        assert!(run("#!ipxe\nmenu Pick one\n", &mut settings())
            .unwrap_err()
            .contains("menu"));
        assert!(run("<html>", &mut settings()).is_err());
        assert!(run("#!ipxe\necho nothing\n", &mut settings()).is_err());
    }

    #[test]
    fn or_runs_only_after_a_failure() {
        let mut s = settings();
        run(
            "#!ipxe\nisset ${nothing} || set fallback yes\nisset ${mac} || set other yes\nexit\n",
            &mut s,
        )
        .unwrap();
        assert_eq!(s.0.get("fallback").map(String::as_str), Some("yes"));
        assert!(!s.0.contains_key("other"));
    }
}
