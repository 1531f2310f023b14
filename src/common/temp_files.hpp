// Temporaries of outputs that appear whole or not at all: "<name>.tmp-<pid>" beside the final
// name (a file, or merge's whole output directory), renamed into place when complete.
//
// Nothing is left behind:
// - a temporary of a process that is gone (kill -9, power cut) is removed by the next run that
//   writes the same output (remove_stale_temporaries*, called by claim_temporary), which says so
//   through notice();
// - on SIGINT / SIGTERM / SIGHUP (install_interrupt_cleanup, done by the CLI) every registered
//   temporary is removed at once, the "what was finished" note is printed, and the process ends
//   by the same signal (status 130 for Ctrl-C). The signal handler only writes a byte to a pipe;
//   a thread of its own does the removing, so that a long kernel loop that never looks at a flag
//   does not delay it, and so that the removing may allocate and print.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace nanscope {

// "<final_path>.tmp-<pid of this process>".
std::filesystem::path temporary_path(const std::filesystem::path& final_path);

struct StaleTemporary {
  std::filesystem::path path;
  long pid = 0;        // of the process that made it
  uint64_t bytes = 0;  // of its files (all of a directory's)
  std::string error;   // empty when removed; else why it could not be
};
// "removed stale temporary X of a dead process (N bytes)", or why it could not be removed.
std::string describe(const StaleTemporary& t);

// Removes the siblings of final_path named "<its name>.tmp-<PID>" whose process is gone, and
// returns them. A temporary of a live process (another nanscope writing the same output) is
// kept; so is one of this process that it registered. The PID of a dead process may since belong
// to another one: then the temporary stays until that one ends (never the other way round).
std::vector<StaleTemporary> remove_stale_temporaries(const std::filesystem::path& final_path);
// The same for every "<base>.tmp-<PID>" in dir whose base `ours` accepts.
std::vector<StaleTemporary> remove_stale_temporaries_in(
    const std::filesystem::path& dir, const std::function<bool(std::string_view base)>& ours);

// Messages for the user that are not errors (removed stale temporaries). The CLI prints them on
// stderr; without a sink (library use, tests) they are dropped.
void set_notice_sink(std::function<void(const std::string&)> sink);
void notice(const std::string& message);

// Registry of this process's temporaries in flight, removed on an interrupt. Register right
// after creating one; unregister after renaming or removing it.
void register_temporary(const std::filesystem::path& path);
void unregister_temporary(const std::filesystem::path& path);

// Before creating a temporary: registers temporary_path(final_path) and returns it. Used by
// the writers of files (write_file_atomic, SafetensorsWriter), which may run thousands of times
// into one directory: they do not look for stale temporaries, the command does once.
std::filesystem::path register_new_temporary(const std::filesystem::path& final_path);
// The same after removing stale temporaries of final_path (each reported through notice()):
// the one call for an output that a command writes once (merge's directory).
std::filesystem::path claim_temporary(const std::filesystem::path& final_path);

// What the run has finished so far, printed after "nanscope: interrupted: " when a signal ends
// it ("hidden: 3 shard(s) complete ...").
void set_interrupt_note(std::string note);

// Installs the SIGINT / SIGTERM / SIGHUP cleanup (once; a signal ignored when the program
// started, as in `nohup` or a background job, stays ignored).
void install_interrupt_cleanup();
// Whether a signal has started the cleanup; then the main thread must not print an error of
// its own (its writes fail as temporaries vanish): wait_for_interrupt_cleanup() blocks until
// the process ends.
bool interrupt_pending();
[[noreturn]] void wait_for_interrupt_cleanup();
// What the cleanup does before it ends the process: removes every registered temporary and
// returns the lines it would print (one per removed temporary, then the note). For the tests.
std::vector<std::string> remove_registered_temporaries();

}  // namespace nanscope
