#!/bin/bash
# dracut module: check in from the initramfs once the root is mounted.
# Install this directory as /usr/lib/dracut/modules.d/95bootfleet-checkin,
# then `dracut -f --add bootfleet-checkin`.
check() { return 0; }
depends() { echo network; }
install() {
    inst_simple /usr/lib/bootfleet/bootfleet-checkin /bin/bootfleet-checkin
    inst_hook pre-pivot 90 "$moddir/bootfleet-checkin-hook.sh"
}
