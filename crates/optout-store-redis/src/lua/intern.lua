-- ARGV: prefix, source. Returns the source's id.
return tonumber(intern(ARGV[1], ARGV[2]))
