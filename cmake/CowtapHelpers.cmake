# cowtap_library(NAME DEPS ...): one static library per folder, built from every
# .cc in the folder that is not a test (*_test.cc), a fuzz target (*_fuzz.cc)
# or a main (*_main.cc). Unit tests beside the code (*_test.cc) become one
# GoogleTest binary per folder, NAME_test, registered with ctest under the
# label "unit" plus any extra LABELS.
function(cowtap_library name)
  cmake_parse_arguments(ARG "" "" "DEPS;TEST_DEPS;LABELS" ${ARGN})
  file(GLOB srcs CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.cc)
  list(FILTER srcs EXCLUDE REGEX "(_test|_fuzz|_main|_bench)\\.cc$")
  add_library(${name} STATIC ${srcs})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
  if(COWTAP_BUILD_TESTS)
    file(GLOB tests CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*_test.cc)
    if(tests)
      add_executable(${name}_test ${tests})
      target_link_libraries(${name}_test PRIVATE ${name} ${ARG_TEST_DEPS} GTest::gmock GTest::gtest_main)
      gtest_discover_tests(${name}_test
        DISCOVERY_TIMEOUT 60
        PROPERTIES ENVIRONMENT "COWTAP_SOURCE_DIR=${PROJECT_SOURCE_DIR}")
      cowtap_label_discovered_tests(${name}_test unit ${ARG_LABELS})
    endif()
  endif()
endfunction()

# cowtap_label_discovered_tests(TARGET LABEL...): gtest_discover_tests cannot
# pass a list-valued LABELS property (it splits PROPERTIES on ';'), so label
# the discovered tests from an include file that ctest reads after the
# discovery file, where the list of tests is known as TARGET_TESTS.
function(cowtap_label_discovered_tests target)
  set(file ${CMAKE_CURRENT_BINARY_DIR}/${target}_labels.cmake)
  list(JOIN ARGN ";" labels)
  file(WRITE ${file}
    "if(${target}_TESTS)\n  set_tests_properties(\${${target}_TESTS} PROPERTIES LABELS \"${labels}\")\nendif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${file})
endfunction()

# cowtap_fuzzer(NAME SOURCES src... DEPS lib... SEEDS dir): a libFuzzer target
# (only in fuzz builds: -DCOWTAP_FUZZ=ON with clang, see the fuzz preset) and
# its bounded ctest run over the committed seeds in SEEDS (label fuzz, time
# COWTAP_FUZZ_SECONDS). New inputs it finds go to the build tree's corpus,
# never into the source tree. Every fuzzer joins the target cowtap_fuzzers,
# which `make fuzz` builds.
#
# Outside fuzz builds the same sources are linked with tests/fuzz/replay_main.cc
# into ${name}_replay, and ctest fuzz_replay_${name} (labels unit, fuzz-replay)
# feeds it every seed once: `make test` (and the ASan preset) runs each
# target briefly with the normal compiler.
function(cowtap_fuzzer name)
  cmake_parse_arguments(ARG "" "SEEDS" "SOURCES;DEPS" ${ARGN})
  if(NOT COWTAP_FUZZ)
    if(COWTAP_BUILD_TESTS)
      add_executable(${name}_replay ${ARG_SOURCES} ${PROJECT_SOURCE_DIR}/tests/fuzz/replay_main.cc)
      target_include_directories(${name}_replay PRIVATE ${PROJECT_SOURCE_DIR})
      target_link_libraries(${name}_replay PRIVATE ${ARG_DEPS})
      add_test(NAME fuzz_replay_${name} COMMAND ${name}_replay ${ARG_SEEDS})
      set_tests_properties(fuzz_replay_${name} PROPERTIES LABELS "unit;fuzz-replay" TIMEOUT 120)
    endif()
    return()
  endif()
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(STATUS "${name} skipped: COWTAP_FUZZ needs clang (compiler is ${CMAKE_CXX_COMPILER_ID})")
    return()
  endif()
  add_executable(${name} ${ARG_SOURCES})
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR})
  target_link_options(${name} PRIVATE -fsanitize=fuzzer)
  target_link_libraries(${name} PRIVATE ${ARG_DEPS})
  if(NOT TARGET cowtap_fuzzers)
    add_custom_target(cowtap_fuzzers)
  endif()
  add_dependencies(cowtap_fuzzers ${name})
  set(corpus ${CMAKE_CURRENT_BINARY_DIR}/${name}-corpus)
  file(MAKE_DIRECTORY ${corpus})
  add_test(NAME fuzz_${name}
    COMMAND ${name} -max_total_time=${COWTAP_FUZZ_SECONDS} -rss_limit_mb=2048 -timeout=20
            -print_final_stats=1 ${corpus} ${ARG_SEEDS})
  set_tests_properties(fuzz_${name} PROPERTIES LABELS fuzz TIMEOUT 900)
endfunction()
