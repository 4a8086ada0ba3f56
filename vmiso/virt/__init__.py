"""The hypervisor side: libvirt connection and events, domain XML, accelerator probe."""
