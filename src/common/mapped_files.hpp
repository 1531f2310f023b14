// Files nanscope maps read-only, and what happens when one shrinks while mapped (a download or
// a save_pretrained still writing it): touching a page past the new end raises SIGBUS, which
// would kill the process with "Bus error" (exit 135). The handler installed here finds the file
// the faulting address belongs to, prints a message naming it and exits with status 2, the
// status of unusable input.
//
// Why exit from the handler instead of unwinding to an InputError: the pages are read by many
// threads at once (OpenMP loops, scan's workers, merge's pool), deep inside kernels that cannot
// be interrupted. Checks of the file size at safe points (SafetensorsFile::check_unchanged) turn
// the common case, a file that changed between two steps, into an ordinary InputError.
#pragma once

#include <cstddef>

namespace nanscope {

// Records [begin, begin + size) as a mapping of `path`, which must stay valid until
// unregister_mapping. Returns the slot to unregister, or -1 when the fixed table (4096 entries)
// is full; such a mapping is then not named by the handler.
int register_mapping(const void* begin, size_t size, const char* path);
void unregister_mapping(int slot);

// Installs the SIGBUS handler (once per process; later calls do nothing). A SIGBUS outside the
// registered mappings is left to the handler that was there before (or the default action).
void install_mapping_fault_handler();

// With --json: the handler also prints the failure as the one JSON document on stdout,
// {"error": {"kind": "changed", "file": PATH, "message": ...}} (docs/interface.md).
void set_mapping_fault_json(bool on);

// The message the handler writes, for the tests: "nanscope: error: PATH: changed while
// reading: ...\n" into buf (always NUL-terminated); returns its length. Async-signal-safe.
size_t format_mapping_fault(char* buf, size_t cap, const char* path, size_t mapped_size);

}  // namespace nanscope
