//! Script and config templates, rendered with minijinja.
//!
//! Built-in templates (overridable per image with `template = "file"` in
//! the inventory, a file in the boot directory):
//! * `builtin:ipxe` — an assigned machine's iPXE script;
//! * `builtin:menu` — the unknown-machine menu of images;
//! * `builtin:wait` — the unknown-machine poll loop;
//! * `builtin:not-here` — the same loop for a machine whose image this
//!   server does not hold yet (copied from another server);
//! * `builtin:local` — boot from the local disk (exit iPXE);
//! * `builtin:pxelinux`, `builtin:pxelinux-local`, `builtin:grub`,
//!   `builtin:grub-local` — the same decisions for pxelinux and GRUB. The
//!   GRUB config loads the kernel in an `if`: when the Secure Boot chain
//!   refuses it, GRUB fetches `grub.cfg-refused-01-<mac>`, which the router
//!   records on the machine's timeline before handing it back to its
//!   firmware.
//!
//! Every template sees the same context ([`ScriptContext`]). Nothing is
//! HTML-escaped: these are iPXE, pxelinux and GRUB scripts, and each value
//! a template writes is quoted for its format instead ([`Format`]): a value
//! can never end the command it is written into or start another, even if
//! it slipped past the field checks of [`crate::inventory::fields`]. What
//! cannot be quoted in a format (a line break anywhere; an iPXE `||`, `&&`,
//! `;` or `#…` word) fails the render, and the machine is answered with a
//! script that boots locally and says why. `{{ value|safe }}` writes a value
//! as it is (the built-in iPXE template does so only for `script_append`,
//! which is iPXE lines by design).

use std::collections::BTreeMap;

use minijinja::{AutoEscape, Environment};
use serde::Serialize;

const IPXE: &str = "#!ipxe
# bootfleet: {{ mac }}{% if hostname %} ({{ hostname }}){% endif %} boots image {{ image.name }}
kernel {{ kernel_url }}{% for initrd in initrds %} initrd={{ initrd.name }}{% endfor %}{% if cmdline %} {{ cmdline }}{% endif %}
{% for initrd in initrds %}initrd --name {{ initrd.name }} {{ initrd.url }}
{% endfor %}{% if script_append %}{{ script_append|safe }}
{% endif %}boot
";

const MENU: &str = "#!ipxe
# bootfleet: {{ mac }} is not assigned an image
menu bootfleet: {{ mac }} is not assigned an image
{% if images %}item --gap Images
{% for image in images %}item {{ image.name }} {{ image.name }}{% if image.description %} - {{ image.description }}{% endif %}
{% endfor %}{% endif %}item --gap Other
item local Boot from the local disk
choose --default local --timeout {{ menu_timeout_ms }} choice || exit
iseq ${choice} local && exit ||
chain --replace --autofree {{ server }}/boot/{{ mac }}.ipxe?image=${choice:uristring}
";

const WAIT: &str = "#!ipxe
# bootfleet: {{ mac }} waits until an operator assigns it an image
echo bootfleet: {{ mac }} is not assigned an image yet; asking again in {{ poll_seconds }} s
sleep {{ poll_seconds }}
chain --replace --autofree {{ server }}/boot/{{ mac }}.ipxe{{ query }}
";

const NOT_HERE: &str = "#!ipxe
# bootfleet: {{ mac }}: {{ reason }}
echo bootfleet: {{ reason }}; asking again in {{ poll_seconds }} s
sleep {{ poll_seconds }}
chain --replace --autofree {{ server }}/boot/{{ mac }}.ipxe{{ query }}
";

const LOCAL: &str = "#!ipxe
# bootfleet: {{ mac }}: {{ reason }}
echo bootfleet: {{ reason }}; booting from the local disk
exit
";

const PXELINUX: &str = "# bootfleet: {{ mac }}{% if hostname %} ({{ hostname }}){% endif %} boots image {{ image.name }}
DEFAULT bootfleet
PROMPT 0
TIMEOUT 0
LABEL bootfleet
  KERNEL /{{ image.kernel }}
{% if image.initrds %}  INITRD {% for initrd in image.initrds %}/{{ initrd }}{% if not loop.last %},{% endif %}{% endfor %}
{% endif %}  APPEND {{ cmdline }}
";

const PXELINUX_LOCAL: &str = "# bootfleet: {{ mac }}: {{ reason }}
DEFAULT local
PROMPT 0
TIMEOUT 0
LABEL local
  LOCALBOOT 0
";

const GRUB: &str = "# bootfleet: {{ mac }}{% if hostname %} ({{ hostname }}){% endif %} boots image {{ image.name }}
set default=0
set timeout=0
menuentry \"{{ image.name }}\" {
  if linux /{{ image.kernel }}{% if cmdline %} {{ cmdline }}{% endif %}; then
{% if image.initrds %}    initrd{% for initrd in image.initrds %} /{{ initrd }}{% endfor %}
{% endif %}  else
    configfile $prefix/grub.cfg-refused-01-{{ mac }}
  fi
}
";

const GRUB_LOCAL: &str = "# bootfleet: {{ mac }}: {{ reason }}
exit
";

/// The built-in templates, by name.
pub const BUILTIN: [(&str, &str); 9] = [
    ("builtin:ipxe", IPXE),
    ("builtin:menu", MENU),
    ("builtin:wait", WAIT),
    ("builtin:not-here", NOT_HERE),
    ("builtin:local", LOCAL),
    ("builtin:pxelinux", PXELINUX),
    ("builtin:pxelinux-local", PXELINUX_LOCAL),
    ("builtin:grub", GRUB),
    ("builtin:grub-local", GRUB_LOCAL),
];

/// An image as templates see it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ImageView {
    pub name: String,
    pub kernel: String,
    pub initrds: Vec<String>,
    pub cmdline: String,
    pub description: String,
}

/// An initrd with the name iPXE registers it under and its URL.
#[derive(Debug, Clone, Serialize)]
pub struct InitrdView {
    pub name: String,
    pub url: String,
}

/// Everything a template can use.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ScriptContext {
    /// `52:54:00:12:34:56`.
    pub mac: String,
    pub hostname: Option<String>,
    pub image: ImageView,
    pub kernel_url: String,
    pub initrds: Vec<InitrdView>,
    /// The image's command line followed by the machine's additions.
    pub cmdline: String,
    pub script_append: String,
    /// The HTTP base URL, e.g. `http://10.0.0.1:8080`.
    pub server: String,
    /// The iPXE facts the chain script passed on.
    pub facts: BTreeMap<String, String>,
    /// The machine's free values from the inventory.
    pub vars: BTreeMap<String, String>,
    /// For the menu.
    pub images: Vec<ImageView>,
    pub menu_timeout_ms: u32,
    /// For the poll loop.
    pub poll_seconds: u32,
    /// The facts again as a query string (`?uuid=…`), or empty.
    pub query: String,
    /// Why a machine boots locally.
    pub reason: String,
}

/// The compiled templates of one inventory snapshot.
pub struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

/// How a template's output is read, and so how a value is quoted in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// iPXE: words split at whitespace; a word `||`, `&&`, `;` or `#…`
    /// ends the command and cannot be quoted, so it fails the render.
    Ipxe,
    /// pxelinux: a keyword takes the rest of its line as it is; only a line
    /// break could add a directive.
    Pxelinux,
    /// GRUB's shell: a word with a character GRUB treats specially
    /// (`$ ; | & < > ( ) { } ' " \ # * ? [ ]`) is single-quoted.
    Grub,
}

impl Format {
    /// The format of template `name`: the built-ins by name, and an
    /// operator's template (it renders an image's iPXE script) as iPXE.
    pub fn of_template(name: &str) -> Format {
        if name.starts_with("builtin:pxelinux") {
            Format::Pxelinux
        } else if name.starts_with("builtin:grub") {
            Format::Grub
        } else {
            Format::Ipxe
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Format::Ipxe => "ipxe",
            Format::Pxelinux => "pxelinux",
            Format::Grub => "grub",
        }
    }

    /// `value` written so that it stays inside the command it is put in.
    pub fn quote(self, value: &str) -> Result<std::borrow::Cow<'_, str>, String> {
        use std::borrow::Cow;
        if let Some(bad) = value
            .chars()
            .find(|&c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
        {
            return Err(format!(
                "a value holds the control character {bad:?}, which would start a new {} command",
                self.tag()
            ));
        }
        match self {
            Format::Pxelinux => Ok(Cow::Borrowed(value)),
            Format::Ipxe => match crate::inventory::fields::ipxe_terminator(value) {
                Some(word) => Err(format!(
                    "a value holds the word {word:?}, which would end the iPXE command"
                )),
                None => Ok(Cow::Borrowed(value)),
            },
            Format::Grub => {
                const SPECIAL: &str = "$;|&<>(){}'\"\\#*?[]";
                if !value.chars().any(|c| SPECIAL.contains(c)) {
                    return Ok(Cow::Borrowed(value));
                }
                let quoted = value
                    .split_whitespace()
                    .map(|word| {
                        if word.chars().any(|c| SPECIAL.contains(c)) {
                            format!("'{}'", word.replace('\'', "'\\''"))
                        } else {
                            word.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                Ok(Cow::Owned(quoted))
            }
        }
    }
}

/// Writes a template value quoted for the template's format (minijinja's
/// formatter, called for every `{{ … }}`).
fn quote_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &minijinja::Value,
) -> Result<(), minijinja::Error> {
    let format = match state.auto_escape() {
        AutoEscape::Custom(tag) if tag == "pxelinux" => Format::Pxelinux,
        AutoEscape::Custom(tag) if tag == "grub" => Format::Grub,
        AutoEscape::Custom(_) => Format::Ipxe,
        _ => return minijinja::escape_formatter(out, state, value),
    };
    let text = value.to_string();
    if value.is_safe() {
        return Ok(out.write_str(&text)?);
    }
    let quoted = format
        .quote(&text)
        .map_err(|why| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, why))?;
    Ok(out.write_str(&quoted)?)
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|name| AutoEscape::Custom(Format::of_template(name).tag().into()));
    env.set_formatter(quote_formatter);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .expect("default delimiters are valid"),
    );
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env
}

impl Templates {
    /// The built-ins plus the operator's templates (name → source).
    pub fn new(custom: &BTreeMap<String, String>) -> Result<Self, minijinja::Error> {
        let mut env = environment();
        for (name, source) in BUILTIN {
            env.add_template(name, source)?;
        }
        for (name, source) in custom {
            env.add_template_owned(name.clone(), source.clone())?;
        }
        Ok(Self { env })
    }

    /// Renders template `name` with `context`.
    pub fn render(&self, name: &str, context: &ScriptContext) -> Result<String, minijinja::Error> {
        self.env
            .get_template(name)?
            .render(minijinja::value::Serde(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> ScriptContext {
        ScriptContext {
            mac: "52:54:00:12:34:56".into(),
            hostname: Some("node01".into()),
            image: ImageView {
                name: "debian12".into(),
                kernel: "debian12/vmlinuz".into(),
                initrds: vec!["debian12/initrd.img".into(), "fw.cpio".into()],
                cmdline: "console=ttyS0".into(),
                description: String::new(),
            },
            kernel_url: "http://10.0.0.1/debian12/vmlinuz".into(),
            initrds: vec![
                InitrdView {
                    name: "initrd.img".into(),
                    url: "http://10.0.0.1/debian12/initrd.img".into(),
                },
                InitrdView {
                    name: "fw.cpio".into(),
                    url: "http://10.0.0.1/fw.cpio".into(),
                },
            ],
            cmdline: "console=ttyS0 node=1".into(),
            server: "http://10.0.0.1".into(),
            ..ScriptContext::default()
        }
    }

    fn render(name: &str, context: &ScriptContext) -> String {
        Templates::new(&BTreeMap::new())
            .unwrap()
            .render(name, context)
            .unwrap()
    }

    #[test]
    fn ipxe_script_for_an_assigned_machine() {
        assert_eq!(
            render("builtin:ipxe", &context()),
            "#!ipxe\n\
             # bootfleet: 52:54:00:12:34:56 (node01) boots image debian12\n\
             kernel http://10.0.0.1/debian12/vmlinuz initrd=initrd.img initrd=fw.cpio console=ttyS0 node=1\n\
             initrd --name initrd.img http://10.0.0.1/debian12/initrd.img\n\
             initrd --name fw.cpio http://10.0.0.1/fw.cpio\n\
             boot\n"
        );
        let mut bare = context();
        bare.initrds.clear();
        bare.cmdline.clear();
        bare.hostname = None;
        bare.script_append = "echo hello".into();
        assert_eq!(
            render("builtin:ipxe", &bare),
            "#!ipxe\n\
             # bootfleet: 52:54:00:12:34:56 boots image debian12\n\
             kernel http://10.0.0.1/debian12/vmlinuz\n\
             echo hello\n\
             boot\n"
        );
    }

    #[test]
    fn pxelinux_and_grub_configs() {
        let pxelinux = render("builtin:pxelinux", &context());
        assert!(
            pxelinux.contains("  KERNEL /debian12/vmlinuz\n"),
            "{pxelinux}"
        );
        assert!(
            pxelinux.contains("  INITRD /debian12/initrd.img,/fw.cpio\n"),
            "{pxelinux}"
        );
        assert!(
            pxelinux.contains("  APPEND console=ttyS0 node=1\n"),
            "{pxelinux}"
        );
        let grub = render("builtin:grub", &context());
        assert!(
            grub.contains("  if linux /debian12/vmlinuz console=ttyS0 node=1; then\n"),
            "{grub}"
        );
        assert!(
            grub.contains("    initrd /debian12/initrd.img /fw.cpio\n"),
            "{grub}"
        );
    }

    #[test]
    fn menu_lists_images_and_defaults_to_local_boot() {
        let mut menu = context();
        menu.images = vec![menu.image.clone()];
        menu.menu_timeout_ms = 30000;
        let script = render("builtin:menu", &menu);
        assert!(script.contains("item debian12 debian12\n"), "{script}");
        assert!(
            script.contains("choose --default local --timeout 30000 choice"),
            "{script}"
        );
        assert!(script.contains(
            "chain --replace --autofree http://10.0.0.1/boot/52:54:00:12:34:56.ipxe?image=${choice:uristring}"
        ));
    }

    #[test]
    fn custom_templates_and_their_errors() {
        let mut custom = BTreeMap::new();
        custom.insert(
            "mine.j2".to_string(),
            "#!ipxe\necho {{ vars.rack }} {{ facts.serial }}\n".to_string(),
        );
        let templates = Templates::new(&custom).unwrap();
        let mut ctx = context();
        ctx.vars.insert("rack".into(), "r7".into());
        ctx.facts.insert("serial".into(), "S1".into());
        assert_eq!(
            templates.render("mine.j2", &ctx).unwrap(),
            "#!ipxe\necho r7 S1\n"
        );
    }

    /// Every field a template writes, set to every hostile value, in every
    /// format: the render fails, or it has exactly the lines of a benign
    /// render and no word that would end a command there.
    #[test]
    fn no_field_adds_a_command_in_any_format() {
        type Set = fn(&mut ScriptContext, &str);
        let fields: [(&str, Set); 10] = [
            ("mac", |c, v| c.mac = v.into()),
            ("hostname", |c, v| c.hostname = Some(v.into())),
            ("image name", |c, v| c.image.name = v.into()),
            ("kernel path", |c, v| c.image.kernel = v.into()),
            ("initrd path", |c, v| c.image.initrds[0] = v.into()),
            ("kernel url", |c, v| c.kernel_url = v.into()),
            ("initrd url", |c, v| c.initrds[0].url = v.into()),
            ("cmdline", |c, v| c.cmdline = v.into()),
            ("vars", |c, v| {
                c.vars.insert("rack".into(), v.into());
            }),
            ("facts", |c, v| {
                c.facts.insert("serial".into(), v.into());
            }),
        ];
        let mut custom = BTreeMap::new();
        custom.insert(
            "mine.j2".to_string(),
            "#!ipxe\necho {{ vars.rack }} {{ facts.serial }}\nkernel {{ kernel_url }} {{ cmdline }}\nboot\n"
                .to_string(),
        );
        let templates = Templates::new(&custom).unwrap();
        let mut benign = context();
        benign.vars.insert("rack".into(), "r7".into());
        benign.facts.insert("serial".into(), "S1".into());
        for template in [
            "builtin:ipxe",
            "builtin:pxelinux",
            "builtin:grub",
            "mine.j2",
        ] {
            let format = Format::of_template(template);
            let benign_script = templates.render(template, &benign).unwrap();
            let lines = benign_script.lines().count();
            for (field, set) in fields {
                for hostile in crate::inventory::fields::HOSTILE {
                    let mut ctx = benign.clone();
                    set(&mut ctx, hostile);
                    let Ok(script) = templates.render(template, &ctx) else {
                        continue;
                    };
                    if script == benign_script {
                        continue; // the template does not write this field
                    }
                    let what = format!("{field} = {hostile:?} in {template}:\n{script}");
                    assert_ne!(format, Format::Ipxe, "iPXE took {what}");
                    assert_eq!(script.lines().count(), lines, "{what}");
                    if format == Format::Grub {
                        assert!(
                            script
                                .split_whitespace()
                                .all(|w| !matches!(w, "||" | "&&" | ";")),
                            "{what}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn grub_quotes_words_its_shell_would_read() {
        assert_eq!(
            Format::Grub.quote("console=ttyS0 quiet").unwrap(),
            "console=ttyS0 quiet"
        );
        assert_eq!(
            Format::Grub.quote("a=$x it's ;").unwrap(),
            r"'a=$x' 'it'\''s' ';'"
        );
        assert_eq!(Format::Pxelinux.quote("a || b").unwrap(), "a || b");
        assert!(Format::Pxelinux.quote("a\nDEFAULT evil").is_err());
        assert!(Format::Ipxe.quote("a #b").is_err());
        assert_eq!(Format::Ipxe.quote("ip=${ip} a|b").unwrap(), "ip=${ip} a|b");
    }

    #[test]
    fn script_append_is_written_as_lines() {
        let mut ctx = context();
        ctx.script_append = "echo one\necho two".into();
        let script = render("builtin:ipxe", &ctx);
        assert!(script.ends_with("echo one\necho two\nboot\n"), "{script}");
    }
}
