# A stand-in for Vagrant's configuration API: `testbed import` evaluates a
# Vagrantfile with it, so loops, variables and helper methods work as they
# do under Vagrant, and prints as JSON what the file told it. Nothing is
# acted on. Every setting is kept with the Vagrantfile line that made it;
# what testbed does not know is kept too, so that it is never dropped
# silently.
#
#   ruby - VAGRANTFILE < stand_in.rb   (run in the Vagrantfile's folder)
#
# Its classes live in a module of their own, so that a Vagrantfile's own
# constants (`Settings = YAML.load_file(…)`) do not replace them.

require "json"

module TestbedStandIn
  # The Vagrantfile, as its frames name it.
  FILE = File.expand_path(ARGV.shift.to_s)

  # The Vagrantfile line of the call being recorded (0: none).
  def self.line
    frame = caller_locations.find { |f| f.absolute_path == FILE || f.path == FILE }
    frame ? frame.lineno : 0
  end

  # What Ruby asks an object when converting it (`puts`, `flatten`): never
  # taken for settings.
  CONVERSIONS = %w[to_ary to_str to_hash to_proc to_io].freeze

  # `vb.memory = 1024`, `ssh.username = "x"`: any setting of a namespace,
  # kept in order with its line. Settings read back (`vb.memory`) give what
  # was set; any other call is kept as a note.
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
      return super if key.start_with?("__") || CONVERSIONS.include?(key)
      line = TestbedStandIn.line
      if key.end_with?("=")
        @values[key.chomp("=")] = { "value" => args.first, "line" => line }
      elsif args.empty? && block.nil? && @values.key?(key)
        return @values[key]["value"]
      else
        @notes << { "setting" => "#{@scope}.#{key}", "line" => line }
      end
      nil
    end

    def respond_to_missing?(name, *)
      !CONVERSIONS.include?(name.to_s)
    end
  end

  # A provider block (`config.vm.provider :virtualbox do |vb| … end`).
  class Provider < Settings
    def initialize(name, notes)
      super(name, notes)
      @customize = []
    end

    # `customize [...]`, or `customize "pre-boot", [...]` (an event of its own).
    def customize(*args)
      line = TestbedStandIn.line
      command, event = args.last, (args.length > 1 ? args.first.to_s : nil)
      if event || !command.is_a?(Array)
        @notes << { "setting" => "#{@scope}.customize #{args.inspect}", "line" => line }
      else
        @customize << { "command" => command.map(&:to_s), "line" => line }
      end
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
      @__networks = []
      @__providers = []
      @__provisioners = []
      @__defines = []
      @__folders = []
    end

    def network(kind, options = {}, **more)
      options = options.merge(more)
      @__networks << { "kind" => kind.to_s, "options" => options, "line" => TestbedStandIn.line }
    end

    # The block's second argument, `override`, is a config of its own: what
    # it sets applies to this provider only, and is kept as a note.
    def provider(name, **_options, &block)
      line = TestbedStandIn.line
      provider = Provider.new(name.to_s, @notes)
      override = Config.new(@notes)
      block&.call(provider, override)
      unless override.empty?
        @notes << { "text" => "what the `override` of provider #{name} sets is not carried over", "line" => line }
      end
      @__providers << {
        "name" => name.to_s,
        "settings" => provider.__values,
        "customize" => provider.__customize,
        "line" => line,
      }
    end

    def provision(kind, options = {}, **more, &block)
      options = options.merge(more)
      line = TestbedStandIn.line
      if block
        settings = Settings.new("provision", @notes)
        block.call(settings)
        settings.__values.each { |key, set| options[key.to_sym] = set["value"] }
      end
      @__provisioners << { "kind" => kind.to_s, "options" => options, "line" => line }
    end

    def synced_folder(from, to, options = {}, **more)
      options = options.merge(more)
      @__folders << { "from" => from.to_s, "to" => to.to_s, "options" => options, "line" => TestbedStandIn.line }
    end

    def define(name, options = {}, **more, &block)
      line = TestbedStandIn.line
      machine = Config.new(@notes)
      block&.call(machine)
      @__defines << { "name" => name.to_s, "options" => options.merge(more), "config" => machine, "line" => line }
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
      return super unless args.empty? && !CONVERSIONS.include?(name.to_s)
      @namespaces[name.to_s] ||= Settings.new("config.#{name}", @notes)
    end

    def respond_to_missing?(name, *)
      !CONVERSIONS.include?(name.to_s)
    end

    def empty?
      h = to_h
      h["settings"].empty? && h["others"].values.all?(&:empty?) &&
        %w[networks providers provisioners synced_folders defines].all? { |k| h[k].empty? }
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

  # Values JSON has no word for (symbols, ranges) as their Ruby text.
  def self.plain(value)
    case value
    when Hash then value.to_h { |k, v| [k.to_s, plain(v)] }
    when Array then value.map { |v| plain(v) }
    when String, Integer, Float, TrueClass, FalseClass, NilClass then value
    else value.to_s
    end
  end

  def self.report_error(kind, message, line)
    $stderr.puts({ "error" => kind, "message" => message, "line" => line }.to_json)
  end
end

# The module a Vagrantfile talks to.
module Vagrant
  VERSION = "2.4.1"

  @configs = []
  @notes = []

  # `Vagrant::Util::Platform.windows?`, asked to pick synced folder types.
  module Util
    module Platform
      def self.windows?; false; end
      def self.darwin?; false; end
      def self.linux?; true; end
    end
  end

  # Vagrant 1's `Vagrant::Config.run`.
  module Config
    def self.run(*)
      raise NotImplementedError, "a Vagrant 1 Vagrantfile (`Vagrant::Config.run`): testbed imports Vagrant 2's `Vagrant.configure(\"2\")`"
    end
  end

  class << self
    attr_reader :configs, :notes

    def configure(_version)
      config = TestbedStandIn::Config.new(@notes)
      yield config
      @configs << config
    end

    def require_version(*) end

    # Said yes, so that what a plugin's settings would set is kept (as
    # notes) rather than skipped or refused.
    def has_plugin?(name, *)
      @notes << { "text" => "plugin #{name} is taken as installed; what its settings set is listed apart", "line" => TestbedStandIn.line }
      true
    end

    def plugin(*)
      Class.new
    end
  end
end

# What the Vagrantfile prints goes to stderr: stdout carries the record.
record_out = $stdout.dup
$stdout.reopen($stderr)
begin
  Dir.chdir(File.dirname(TestbedStandIn::FILE)) do
    eval(File.read(TestbedStandIn::FILE), TOPLEVEL_BINDING, TestbedStandIn::FILE, 1)
  end
rescue SyntaxError => e
  TestbedStandIn.report_error("syntax", e.message, nil)
  exit 3
rescue StandardError, ScriptError, SystemExit => e
  frame = e.backtrace_locations&.find { |f| f.absolute_path == TestbedStandIn::FILE || f.path == TestbedStandIn::FILE }
  message = e.is_a?(SystemExit) ? "the Vagrantfile exits here (exit or abort)" : "#{e.message} (#{e.class})"
  TestbedStandIn.report_error("evaluation", message, frame&.lineno)
  exit 4
end

record_out.puts JSON.pretty_generate({
  "configs" => TestbedStandIn.plain(Vagrant.configs.map(&:to_h)),
  "notes" => TestbedStandIn.plain(Vagrant.notes),
})
record_out.flush
