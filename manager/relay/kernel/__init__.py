"""The XDP fast path from userspace: bcc load/attach/adopt, typed maps, structs."""
