//! The boot policy, pure: from a machine's MAC, the image it picked from
//! the menu (if any), the inventory snapshot and which one-shot
//! assignments are used up, what the machine boots. No I/O, no lock, no
//! clock: [`super::Router`] gathers the inputs, calls [`decide`], and renders
//! the [`Choice`]; the same decision serves iPXE scripts and pxelinux/GRUB
//! configs.
//!
//! Decision order (after an operator's own per-MAC script, which the
//! router serves before asking the policy):
//! 1. a machine marked `netboot = false` boots its local disk;
//! 2. a one-shot assignment that has already been used boots the local
//!    disk until the operator raises `rearm`;
//! 3. an assigned image is booted;
//! 4. under the menu policy, an image the machine picked from the menu;
//! 5. anything else gets the inventory's unknown-machine policy.

use crate::inventory::{Image, Machine, Snapshot, UnknownPolicy};
use crate::proto::Mac;

/// Why a listed machine marked `netboot = false` boots locally.
pub const DO_NOT_NETBOOT: &str = "marked do-not-netboot in the inventory";
/// Why a one-shot machine whose assignment is used boots locally.
pub const ONE_SHOT_USED: &str = "one-shot assignment already used (raise rearm to boot it again)";

/// What a machine boots, borrowing from the snapshot.
#[derive(Debug, Clone, Copy)]
pub enum Choice<'a> {
    /// Its assigned image.
    Assigned {
        machine: &'a Machine,
        image: &'a Image,
    },
    /// An image it picked from the unknown-machine menu.
    MenuChoice {
        machine: Option<&'a Machine>,
        image: &'a Image,
    },
    /// The unknown-machine policy: listed without an image, or not listed.
    Unknown {
        machine: Option<&'a Machine>,
        policy: UnknownPolicy,
    },
    /// Its local disk, and why.
    Local {
        machine: &'a Machine,
        why: &'static str,
    },
}

impl<'a> Choice<'a> {
    /// The inventory's record of the machine, when it lists it.
    pub fn machine(&self) -> Option<&'a Machine> {
        match *self {
            Choice::Assigned { machine, .. } | Choice::Local { machine, .. } => Some(machine),
            Choice::MenuChoice { machine, .. } | Choice::Unknown { machine, .. } => machine,
        }
    }
}

/// What `mac` boots under `snapshot`. `menu_choice` is the image named in
/// its request (honoured only under the menu policy, for a machine with no
/// assignment); `one_shot_used(mac, rearm)` says whether a one-shot
/// assignment at generation `rearm` has been used.
pub fn decide<'a>(
    snapshot: &'a Snapshot,
    mac: Mac,
    menu_choice: Option<&str>,
    one_shot_used: impl Fn(Mac, u64) -> bool,
) -> Choice<'a> {
    let listed = snapshot.machines.get(&mac);
    if let Some(machine) = listed {
        if !machine.netboot {
            return Choice::Local {
                machine,
                why: DO_NOT_NETBOOT,
            };
        }
        if let Some(image) = snapshot.image_of(machine) {
            if machine.one_shot && one_shot_used(mac, machine.rearm) {
                return Choice::Local {
                    machine,
                    why: ONE_SHOT_USED,
                };
            }
            return Choice::Assigned { machine, image };
        }
    }
    let policy = snapshot.unknown_policy;
    if policy == UnknownPolicy::Menu {
        if let Some(image) = menu_choice.and_then(|name| snapshot.images.get(name)) {
            return Choice::MenuChoice {
                machine: listed,
                image,
            };
        }
    }
    Choice::Unknown {
        machine: listed,
        policy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Snapshot;

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x00, 0x00, 0x01]);

    fn snapshot(toml: &str) -> Snapshot {
        let root = tempfile::tempdir().unwrap();
        for file in ["vmlinuz", "initrd.img"] {
            std::fs::write(root.path().join(file), b"x").unwrap();
        }
        let path = root.path().join("inventory.toml");
        std::fs::write(&path, toml).unwrap();
        Snapshot::load(&path, root.path(), 1).expect("the test inventory loads")
    }

    const IMAGES: &str = r#"
[unknown]
policy = "menu"
[images.alma]
kernel = "vmlinuz"
initrds = ["initrd.img"]
[images.rescue]
kernel = "vmlinuz"
"#;

    fn never_used(_: Mac, _: u64) -> bool {
        false
    }

    #[test]
    fn an_assigned_machine_boots_its_image_until_its_one_shot_is_used() {
        let snapshot = snapshot(&format!(
            "{IMAGES}\n[machines.\"{MAC}\"]\nimage = \"alma\"\none_shot = true\nrearm = 2\n"
        ));
        let choice = decide(&snapshot, MAC, Some("rescue"), never_used);
        assert!(
            matches!(choice, Choice::Assigned { image, .. } if image.name == "alma"),
            "{choice:?}"
        );
        // Used at an older generation: still armed.
        let choice = decide(&snapshot, MAC, None, |_, rearm| rearm < 2);
        assert!(matches!(choice, Choice::Assigned { .. }), "{choice:?}");
        let choice = decide(&snapshot, MAC, None, |mac, rearm| mac == MAC && rearm == 2);
        assert!(
            matches!(choice, Choice::Local { why, .. } if why == ONE_SHOT_USED),
            "{choice:?}"
        );
    }

    #[test]
    fn do_not_netboot_wins_over_everything() {
        let snapshot = snapshot(&format!(
            "{IMAGES}\n[machines.\"{MAC}\"]\nimage = \"alma\"\nnetboot = false\n"
        ));
        let choice = decide(&snapshot, MAC, Some("rescue"), never_used);
        assert!(
            matches!(choice, Choice::Local { why, .. } if why == DO_NOT_NETBOOT),
            "{choice:?}"
        );
    }

    #[test]
    fn a_menu_choice_counts_only_under_the_menu_policy_and_for_a_real_image() {
        let listed = snapshot(&format!(
            "{IMAGES}\n[machines.\"{MAC}\"]\nhostname = \"n1\"\n"
        ));
        let choice = decide(&listed, MAC, Some("rescue"), never_used);
        assert!(
            matches!(choice, Choice::MenuChoice { machine: Some(_), image } if image.name == "rescue"),
            "{choice:?}"
        );
        let choice = decide(&listed, MAC, Some("no-such-image"), never_used);
        assert!(
            matches!(
                choice,
                Choice::Unknown {
                    machine: Some(_),
                    policy: UnknownPolicy::Menu
                }
            ),
            "{choice:?}"
        );
        let waiting = snapshot(&IMAGES.replace("policy = \"menu\"", "policy = \"wait\""));
        let choice = decide(&waiting, MAC, Some("rescue"), never_used);
        assert!(
            matches!(
                choice,
                Choice::Unknown {
                    machine: None,
                    policy: UnknownPolicy::Wait
                }
            ),
            "{choice:?}"
        );
    }
}
