#!/bin/sh
# dracut pre-pivot hook: the network is up; tell bootfleet.
BOOTFLEET_CHECKIN_TRIES=5 /bin/bootfleet-checkin || true
