# A stand-in for Vagrant's configuration API: `testbed import` evaluates a
# Vagrantfile with it, so loops, variables and helper methods work as they
# do under Vagrant, and prints as JSON what the file told it. Nothing is
# acted on. Every setting is kept with the Vagrantfile line that made it;
# what testbed does not know is kept too, so that it is never dropped
# silently.
#
#   ruby stand_in.rb VAGRANTFILE   (run in the Vagrantfile's folder)

require "json"

VAGRANTFILE = File.expand_path(ARGV.fetch(0))

# The Vagrantfile line of the call being recorded.
def vagrantfile_line
  frame = caller_locations.find { |f| f.absolute_path == VAGRANTFILE || f.path == VAGRANTFILE }
  frame ? frame.lineno : 0
end

# `vb.memory = 1024`, `ssh.username = "x"`: any setting of a namespace,
# kept in order with its line. Settings read back (`vb.memory`) give what
# was set.
class Settings
  def initialize(scope, notes)
    @scope = scope
    @notes = notes
    @values = {}
  end

  def __values
    @values
  end

  def method_missing(name, *args, &block)
    key = name.to_s
    return super if key.start_with?("__") || key == "to_ary" || key == "to_str"
    line = vagrantfile_line
    if key.end_with?("=")
      @values[key.chomp("=")] = { "value" => args.first, "line" => line }
    elsif args.empty? && block.nil? && @values.key?(key)
      return @values[key]["value"]
    else
      @notes << { "setting" => "#{@scope}.#{key}", "args" => args, "line" => line }
    end
    nil
  end

  def respond_to_missing?(*)
    true
  end
end

# A provider block (`config.vm.provider :virtualbox do |vb| … end`).
class Provider < Settings
  def initialize(name, notes)
    super("#{name}", notes)
    @customize = []
  end

  def customize(command)
    @customize << { "command" => command.map(&:to_s), "line" => vagrantfile_line }
  end

  def __customize
    @customize
  end
end

# `config.vm`: what testbed carries over has a method of its own; the rest
# goes through Settings.
class VM < Settings
  attr_reader :__networks, :__providers, :__provisioners, :__defines, :__folders

  def initialize(notes)
    super("config.vm", notes)
    @notes = notes
    @__networks = []
    @__providers = []
    @__provisioners = []
    @__defines = []
    @__folders = []
  end

  def network(kind, **options)
    @__networks << { "kind" => kind.to_s, "options" => options, "line" => vagrantfile_line }
  end

  def provider(name, **_options, &block)
    provider = Provider.new(name.to_s, @notes)
    block&.call(provider, self)
    @__providers << {
      "name" => name.to_s,
      "settings" => provider.__values,
      "customize" => provider.__customize,
      "line" => vagrantfile_line,
    }
  end

  def provision(kind, **options, &block)
    line = vagrantfile_line
    if block
      block_settings = Settings.new("provision", @notes)
      block.call(block_settings)
      block_settings.__values.each { |key, set| options[key.to_sym] = set["value"] }
    end
    @__provisioners << { "kind" => kind.to_s, "options" => options, "line" => line }
  end

  def synced_folder(from, to, **options)
    @__folders << { "from" => from.to_s, "to" => to.to_s, "options" => options, "line" => vagrantfile_line }
  end

  def define(name, **options, &block)
    machine = Config.new(@notes)
    block&.call(machine)
    @__defines << { "name" => name.to_s, "options" => options, "config" => machine, "line" => vagrantfile_line }
  end
end

# What `Vagrant.configure` yields: `config.vm` and every other namespace
# (`config.ssh`, `config.hostmanager`, …) as settings kept for the notes.
class Config
  attr_reader :vm

  def initialize(notes)
    @notes = notes
    @vm = VM.new(notes)
    @namespaces = {}
  end

  def method_missing(name, *args)
    return super unless args.empty?
    @namespaces[name.to_s] ||= Settings.new("config.#{name}", @notes)
  end

  def respond_to_missing?(*)
    true
  end

  def to_h
    {
      "settings" => @vm.__values,
      "networks" => @vm.__networks,
      "providers" => @vm.__providers,
      "provisioners" => @vm.__provisioners,
      "synced_folders" => @vm.__folders,
      "others" => @namespaces.map { |name, settings| [name, settings.__values] }.to_h,
      "defines" => @vm.__defines.map { |d| d.merge("config" => d["config"].to_h) },
    }
  end
end

# The module a Vagrantfile talks to.
module Vagrant
  @configs = []
  @notes = []

  class << self
    attr_reader :configs, :notes

    def configure(_version)
      config = Config.new(@notes)
      yield config
      @configs << config
    end

    def require_version(*) end

    def has_plugin?(*)
      false
    end
  end
end

# Values JSON has no word for (symbols, ranges) as their Ruby text.
class Object
  def __plain
    case self
    when Hash then to_h { |k, v| [k.to_s, v.__plain] }
    when Array then map(&:__plain)
    when String, Integer, Float, TrueClass, FalseClass, NilClass then self
    else to_s
    end
  end
end

begin
  Dir.chdir(File.dirname(VAGRANTFILE)) do
    eval(File.read(VAGRANTFILE), TOPLEVEL_BINDING, VAGRANTFILE, 1)
  end
rescue SyntaxError => e
  warn({ "error" => "syntax", "message" => e.message }.to_json)
  exit 3
rescue StandardError, ScriptError => e
  frame = e.backtrace_locations&.find { |f| f.absolute_path == VAGRANTFILE || f.path == VAGRANTFILE }
  warn({ "error" => "evaluation", "message" => "#{e.message} (#{e.class})", "line" => frame&.lineno }.to_json)
  exit 4
end

puts JSON.pretty_generate({
  "configs" => Vagrant.configs.map(&:to_h).__plain,
  "notes" => Vagrant.notes.__plain,
})
