#include "tools/cli/cli.h"

#include <fmt/format.h>

#include <exception>
#include <new>

#include "tools/cli/command.h"

namespace cowtap::cli {

void AddFormatFlag(CLI::App& app, std::string* format) {
  app.add_option("-f,--format", *format, "Image format (raw, qcow, qcow2); probed from the file when omitted")
      ->check(CLI::IsMember({"raw", "qcow", "qcow2"}));
}

cow::OpenOptions CliOpenOptions(bool read_only, const std::string& format) {
  cow::OpenOptions o;
  o.read_only = read_only;
  if (!format.empty()) o.format = cow::ParseFormatName(format);
  o.remap_cache_entries = 0;
  return o;
}

int RunCli(int argc, char** argv) {
  CLI::App app("cowtap: create, inspect, check and edit qcow2 / qcow / raw disk images.\n"
               "Each command's --help describes it.",
               "cowtap");
  app.require_subcommand(1);
  app.fallthrough(false);
  std::vector<std::unique_ptr<Command>> commands = BuiltinCommands();
  std::vector<CLI::App*> subs;
  for (auto& command : commands) {
    CLI::App* sub = app.add_subcommand(std::string(command->name()), std::string(command->summary()));
    command->Configure(*sub);
    subs.push_back(sub);
  }

  auto parsed_name = [&]() -> std::string {
    for (size_t i = 0; i < subs.size(); ++i)
      if (subs[i]->parsed()) return std::string(commands[i]->name());
    return "";
  };

  if (argc >= 2 && argv[1][0] != '-') {
    const std::string_view first = argv[1];
    bool known = false;
    for (const auto& command : commands) known = known || command->name() == first;
    if (!known) {
      fmt::print(stderr, "cowtap: unknown command '{}'\nRun 'cowtap --help' for the list of commands.\n", first);
      return 1;
    }
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    const std::string name = parsed_name();
    if (name.empty()) {
      fmt::print(stderr, "cowtap: {}\nRun 'cowtap --help' for the list of commands.\n", e.what());
    } else {
      fmt::print(stderr, "cowtap {}: {}\nRun 'cowtap {} --help' for usage.\n", name, e.what(), name);
    }
    return 1;
  }

  for (size_t i = 0; i < subs.size(); ++i) {
    if (!subs[i]->parsed()) continue;
    const std::string_view name = commands[i]->name();
    try {
      return commands[i]->Run();
    } catch (const std::bad_alloc&) {
      fmt::print(stderr, "cowtap {}: out of memory\n", name);
    } catch (const std::exception& e) {
      fmt::print(stderr, "cowtap {}: internal error: {}\n", name, e.what());
    }
    return 1;
  }
  fmt::print(stderr, "cowtap: no command given; run 'cowtap --help'\n");
  return 1;
}

}  // namespace cowtap::cli
