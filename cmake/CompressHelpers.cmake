# compress_library(NAME SOURCES ... [PUBLIC ...] [PRIVATE ...])
# One folder, one library: sources, an alias compress::<short>, the repository
# root as the public include directory, and the given dependencies.
function(compress_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC;PRIVATE" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  string(REPLACE "compress_" "" short ${name})
  add_library(compress::${short} ALIAS ${name})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR}/proto)
  target_link_libraries(${name} PUBLIC ${ARG_PUBLIC} PRIVATE ${ARG_PRIVATE})
endfunction()

# compress_test(NAME [SERIAL] SOURCES ... [LIBS ...]): a GoogleTest binary
# whose tests ctest discovers one by one. SERIAL tests (timing-sensitive
# multi-process ones) run alone even under `ctest -j`.
function(compress_test name)
  cmake_parse_arguments(ARG "SERIAL" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gmock GTest::gtest_main)
  set(properties TIMEOUT 600)
  if(ARG_SERIAL)
    list(APPEND properties RUN_SERIAL TRUE)
  endif()
  gtest_discover_tests(${name} TEST_PREFIX "${name}." DISCOVERY_TIMEOUT 60
                       PROPERTIES ${properties}
                       WORKING_DIRECTORY ${PROJECT_BINARY_DIR})
endfunction()
