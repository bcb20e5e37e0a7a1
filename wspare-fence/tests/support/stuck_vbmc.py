"""A virtualbmc BMC whose power-off is accepted but does nothing.

Test fixture for wspare-fence's "device accepts off but still reports on"
fault (contract F3). It is virtualbmc's own VirtualBMC class serving a real
libvirt domain, with one change: chassis power down (and soft off) answer
"completed normally" without touching the domain. Power status keeps reading
the domain's real state from libvirt, so it keeps saying "on".

    stuck_vbmc.py DOMAIN PORT USERNAME     (password in $STUCK_BMC_PASSWORD)

Prints "listening on 127.0.0.1:PORT" once the UDP socket is bound.
"""

import os
import sys

from virtualbmc.vbmc import VirtualBMC


class StuckVirtualBMC(VirtualBMC):
    def power_off(self):
        # Completion code 0x00: the command was "accepted".
        return None

    def power_shutdown(self):
        return None


def main():
    domain, port, username = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    password = os.environ["STUCK_BMC_PASSWORD"]
    bmc = StuckVirtualBMC(
        username=username,
        password=password,
        port=port,
        address="127.0.0.1",
        domain_name=domain,
        libvirt_uri="qemu:///system",
    )
    print(f"listening on 127.0.0.1:{port}", flush=True)
    bmc.listen(timeout=5)


if __name__ == "__main__":
    main()
