// cowtap: the image command-line tool (create, info, check, map, dump, read,
// write, zero, discard). All logic lives in tools/cli; see cli.h.
#include "tools/cli/cli.h"

int main(int argc, char** argv) { return cowtap::cli::RunCli(argc, argv); }
