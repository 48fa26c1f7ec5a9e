// The table of `cowtap` subcommands. Adding one: write its file with a
// factory, declare the factory in command.h, and list it here.
#include "tools/cli/command.h"

namespace cowtap::cli {

std::vector<std::unique_ptr<Command>> BuiltinCommands() {
  std::vector<std::unique_ptr<Command>> out;
  out.push_back(NewCreateCommand());
  out.push_back(NewInfoCommand());
  out.push_back(NewCheckCommand());
  out.push_back(NewMapCommand());
  out.push_back(NewDumpCommand());
  out.push_back(NewReadCommand());
  out.push_back(NewWriteCommand());
  out.push_back(NewZeroCommand());
  out.push_back(NewDiscardCommand());
  out.push_back(NewCtlCommand());
  out.push_back(NewServeNbdCommand());
  out.push_back(NewBenchCommand());
  return out;
}

}  // namespace cowtap::cli
