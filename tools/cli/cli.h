// RunCli: the whole `cowtap` program behind main(): parses the command line,
// runs the chosen subcommand, and turns every failure (bad arguments, a
// missing or corrupt image, an unexpected exception) into a message on stderr
// and exit code 1, so that no input makes the tool crash.
//
// Thread-safety: call once, from main.
#pragma once

namespace cowtap::cli {

// Returns the process exit code.
int RunCli(int argc, char** argv);

}  // namespace cowtap::cli
