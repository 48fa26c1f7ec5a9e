// Command: one `cowtap` subcommand (create, info, check, ...). The CLI builds
// a CLI11 subcommand per entry of BuiltinCommands(), lets each declare its own
// flags, and runs the one the user named. A new subcommand (ctl, bench,
// guest, ...) is a new file defining a Command and its factory, plus one line
// in BuiltinCommands() (commands.cc).
//
// Thread-safety: a command runs once, on the main thread.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cow/image.h"

namespace cowtap::cli {

class Command {
 public:
  Command() = default;
  Command(const Command&) = delete;
  Command& operator=(const Command&) = delete;
  virtual ~Command() = default;

  // The subcommand's name as typed ("info").
  virtual std::string_view name() const = 0;
  // One line for `cowtap --help`; the subcommand's own --help shows it too.
  virtual std::string_view summary() const = 0;
  // Declares positionals and flags on app (already named and described),
  // binding them to members of the command, and may add a help footer.
  virtual void Configure(CLI::App& app) = 0;
  // Runs after a successful parse and returns the process exit code. Never
  // throws for bad input: errors are printed (ReportError) and give 1.
  virtual int Run() = 0;
};

// Every subcommand of `cowtap`, in the order `cowtap --help` lists them.
std::vector<std::unique_ptr<Command>> BuiltinCommands();

// Factories, one per command file.
std::unique_ptr<Command> NewCreateCommand();
std::unique_ptr<Command> NewInfoCommand();
std::unique_ptr<Command> NewCheckCommand();
std::unique_ptr<Command> NewMapCommand();
std::unique_ptr<Command> NewDumpCommand();
std::unique_ptr<Command> NewReadCommand();
std::unique_ptr<Command> NewWriteCommand();
std::unique_ptr<Command> NewZeroCommand();
std::unique_ptr<Command> NewDiscardCommand();
std::unique_ptr<Command> NewCtlCommand();
std::unique_ptr<Command> NewServeNbdCommand();
std::unique_ptr<Command> NewBenchCommand();

// Shared by the commands that open an image: an optional "-f FMT" flag that
// skips probing, parsed into *format (CLI11 checks the value).
void AddFormatFlag(CLI::App& app, std::string* format);
// OpenOptions for a CLI open: read_only as given, the format from -f (empty:
// probe), and no remap cache (one-shot tools gain nothing from it).
cow::OpenOptions CliOpenOptions(bool read_only, const std::string& format);

}  // namespace cowtap::cli
