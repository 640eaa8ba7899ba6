"""XDP data plane control: loading bcc programs, filling maps, running programs on bytes."""
