// Filled in by its own change.
namespace compress {}
